"""A loaded SD-VAE: config, float32 parameters, pure encode/decode functions, batched host helpers.

`Autoencoder` holds an `AutoencoderConfig` and the parameter pytree of `kl.AutoencoderKL`, and
exposes the network two ways:

  pure     `encode_fn(params, images) -> (mean, std)` and `decode_fn(params, latents) -> images`,
           jax in and out, no host work: call them inside your own `jax.jit` (a training step
           that encodes on the fly, a sampler that decodes at the end);
  on host  `mean, std = vae.encode(images)` and `images = vae.decode(latents)`, numpy (or jax)
           in, numpy float32 out, any batch size: the batch is cut into chunks of `batch_size`
           (the last one zero-padded), each chunk split over the devices of a one-axis mesh
           (default: this process's devices), so each image shape compiles once.

Conventions are diffusers' (and Stable Diffusion's): images NHWC in [-1, 1]; the posterior is a
diagonal Gaussian (mean, std); a diffusion model's latents are `scaling_factor * (mean + std *
eps)` (Rombach et al. 2022, Sec. 4.3.2 / App. D.1); `decode` takes latents *without* that factor,
so divide first. `dtype` is the compute dtype; float32 runs every conv and matmul at
`Precision.HIGHEST`, so a GPU does not silently use TF32 and the numbers stay PyTorch's.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from fmjax import sharding
from fmjax.autoencoders import kl

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
PER_DEVICE_BATCH = 8


def compute_dtype(dtype) -> Any:
  """'float32' | 'bfloat16' (or the jnp dtype) -> the jnp dtype; anything else is refused."""
  for name, value in DTYPES.items():
    if dtype == name or dtype is value or (not isinstance(dtype, str) and jnp.dtype(dtype) == value):
      return value
  raise ValueError(f'Autoencoder dtype {dtype!r}: use one of {list(DTYPES)}.')


@functools.lru_cache(maxsize=None)
def _graphdef_and_template(config: kl.AutoencoderConfig, dtype, precision):
  """The module's graph and abstract state, without allocating the weights."""
  return nnx.split(nnx.eval_shape(lambda: kl.AutoencoderKL(
      config, dtype=dtype, precision=precision, rngs=nnx.Rngs(0))))


def abstract_params(config: kl.AutoencoderConfig) -> dict:
  """The parameter pytree of `config` as nested dicts of `jax.ShapeDtypeStruct` (float32)."""
  return nnx.to_pure_dict(_graphdef_and_template(config, jnp.float32, None)[1])


def flatten(tree, prefix: tuple = ()) -> dict[tuple, Any]:
  """{path tuple: leaf} of a nested dict (the keys of nnx.List entries are ints)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def unflatten(flat: dict[tuple, Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


class Autoencoder:
  """An SD-VAE with its weights; see the module docstring. Build it with `load` or `init`.

  Args:
    config: the network.
    params: its parameter pytree (nested dicts like `abstract_params(config)`), float32.
    dtype: compute dtype, 'float32' or 'bfloat16'; the parameters stay float32.
    batch_size: images per jitted call of `encode` / `decode`, a multiple of the mesh size
      (default 8 per device).
    mesh: a `jax.sharding.Mesh`; the batch is split over all its axes, the parameters are
      replicated. Default: one axis over `jax.local_devices()`.
  """

  def __init__(self, config: kl.AutoencoderConfig, params, *, dtype='float32',
               batch_size: int | None = None, mesh: jax.sharding.Mesh | None = None):
    self.config = config
    self.dtype = compute_dtype(dtype)
    precision = jax.lax.Precision.HIGHEST if self.dtype == jnp.float32 else None
    self._graphdef, self._template = _graphdef_and_template(config, self.dtype, precision)
    _check_params(params, abstract_params(config))
    self.mesh = mesh if mesh is not None else sharding.local_mesh()
    devices = self.mesh.devices.size
    self.batch_size = batch_size or PER_DEVICE_BATCH * devices
    if self.batch_size % devices:
      raise ValueError(f'Autoencoder batch_size {self.batch_size} must be a multiple of the '
                       f'{devices} devices of the mesh.')
    replicated = NamedSharding(self.mesh, P())
    self._batch_sharding = NamedSharding(self.mesh, P(tuple(self.mesh.axis_names)))
    self.params = jax.device_put(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params), replicated)
    # Compilations of the host helpers, by name; tests check each shape compiles once.
    self.trace_counts: collections.Counter = collections.Counter()
    shard = (replicated, self._batch_sharding)
    self._encode = jax.jit(self._counted('encode', self.encode_fn), in_shardings=shard,
                           out_shardings=(self._batch_sharding,) * 2)
    self._decode = jax.jit(self._counted('decode', self.decode_fn), in_shardings=shard,
                           out_shardings=self._batch_sharding)

  # -- description ------------------------------------------------------------------------------

  @property
  def scaling_factor(self) -> float:
    return float(self.config.scaling_factor)

  @property
  def downsample_factor(self) -> int:
    return self.config.downsample_factor

  def latent_shape(self, image_shape_hwc) -> tuple[int, int, int]:
    """(h, w, latent_channels) that `encode` gives for images of shape (H, W, in_channels).

    H / f and W / f when f = downsample_factor divides them (decode then returns H x W); other
    sizes are encoded as diffusers does (each padded stride-2 conv maps n to n // 2), but their
    decode is f times the latent size, not the original size.
    """
    h, w, c = image_shape_hwc
    if c != self.config.in_channels:
      raise ValueError(f'image shape {tuple(image_shape_hwc)}: expected {self.config.in_channels} '
                       'channels (HWC).')
    if min(h, w) < self.downsample_factor:
      raise ValueError(f'image shape {tuple(image_shape_hwc)} is smaller than the downsampling '
                       f'factor {self.downsample_factor}.')
    for _ in range(len(self.config.block_out_channels) - 1):
      h, w = h // 2, w // 2
    return h, w, self.config.latent_channels

  def image_shape(self, latent_shape_hwc) -> tuple[int, int, int]:
    """(H, W, out_channels) that `decode` gives for latents of shape (h, w, latent_channels)."""
    h, w, c = latent_shape_hwc
    if c != self.config.latent_channels:
      raise ValueError(f'latent shape {tuple(latent_shape_hwc)}: expected '
                       f'{self.config.latent_channels} channels (HWC).')
    f = self.downsample_factor
    return h * f, w * f, self.config.out_channels

  @functools.cached_property
  def digest(self) -> str:
    """'sha256:<hex>' of the canonical config JSON and the float32 weights (names, shapes, bytes)."""
    h = hashlib.sha256()
    h.update(json.dumps(self.config.to_dict(), sort_keys=True, separators=(',', ':')).encode())
    flat = {'/'.join(map(str, path)): a for path, a in flatten(jax.device_get(self.params)).items()}
    for name in sorted(flat):
      a = np.ascontiguousarray(flat[name], np.float32)
      h.update(f'|{name}|{a.dtype.str}|{a.shape}|'.encode())
      h.update(a.tobytes())
    return 'sha256:' + h.hexdigest()

  def __repr__(self):
    return (f'Autoencoder({self.config}, dtype={jnp.dtype(self.dtype).name}, '
            f'batch_size={self.batch_size})')

  # -- pure functions ---------------------------------------------------------------------------

  def module(self, params) -> kl.AutoencoderKL:
    """The NNX module holding `params` (arrays or tracers)."""
    state = jax.tree.map(lambda a: a, self._template)   # a fresh State; the cached one stays abstract
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self._graphdef, state)

  def encode_fn(self, params, images):
    """(mean, std), float32 [B, h, w, latent_channels], of images NHWC in [-1, 1]."""
    return self.module(params).encode(images)

  def decode_fn(self, params, latents):
    """Images float32 [B, H, W, out_channels] of latents NHWC (not times scaling_factor)."""
    return self.module(params).decode(latents)

  def decode_scaled_fn(self, params, scaled_latents):
    """Images of latents as a latent diffusion / flow model generates them, z = scaling_factor
    * (mean + std * eps): decoded as D(z / scaling_factor)."""
    return self.decode_fn(params, scaled_latents / self.scaling_factor)

  # -- host helpers -----------------------------------------------------------------------------

  def encode(self, images) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) numpy float32 of images [N, H, W, in_channels] in [-1, 1], any N."""
    images = _batch(images, self.config.in_channels, 'images')
    empty = np.zeros((0,) + self.latent_shape(images.shape[1:]), np.float32)
    mean, std = self._run(self._encode, images, empty, 2)
    return mean, std

  def decode(self, latents) -> np.ndarray:
    """Images numpy float32 [N, H, W, out_channels] of latents [N, h, w, latent_channels]."""
    latents = _batch(latents, self.config.latent_channels, 'latents')
    empty = np.zeros((0,) + self.image_shape(latents.shape[1:]), np.float32)
    return self._run(self._decode, latents, empty, 1)[0]

  def _counted(self, name: str, fn: Callable) -> Callable:
    def run(params, x):
      self.trace_counts[name] += 1
      return fn(params, x)
    return run

  def _run(self, fn, x: np.ndarray, empty: np.ndarray, num_outputs: int) -> list[np.ndarray]:
    """fn over fixed-size zero-padded chunks of x; the next chunk is dispatched before the
    previous one is copied back, so the device is not idle during the copy."""
    n, bs = x.shape[0], self.batch_size
    results, pending = [[] for _ in range(num_outputs)], None

    def collect(item):
      outputs, count = item
      outputs = outputs if isinstance(outputs, tuple) else (outputs,)
      for acc, out in zip(results, outputs):
        acc.append(np.asarray(out)[:count])

    for start in range(0, n, bs):
      chunk = x[start:start + bs]
      count = chunk.shape[0]
      if count < bs:
        chunk = np.concatenate([chunk, np.zeros((bs - count,) + chunk.shape[1:], chunk.dtype)])
      item = (fn(self.params, jax.device_put(chunk, self._batch_sharding)), count)
      if pending is not None:
        collect(pending)
      pending = item
    if pending is not None:
      collect(pending)
    return [np.concatenate(acc) if acc else empty for acc in results]


def _batch(x, channels: int, what: str) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 4 or x.shape[-1] != channels:
    raise ValueError(f'Autoencoder expects {what} NHWC [batch, height, width, {channels}], got '
                     f'shape {x.shape}.')
  return x


def _check_params(params, expected) -> None:
  got = {p: tuple(np.shape(a)) for p, a in flatten(params).items()}
  want = {p: tuple(a.shape) for p, a in flatten(expected).items()}
  if got != want:
    missing, extra = sorted(set(want) - set(got), key=str), sorted(set(got) - set(want), key=str)
    wrong = sorted((p for p in set(got) & set(want) if got[p] != want[p]), key=str)
    raise ValueError(f'Autoencoder params do not fit the config: missing {missing[:5]}, unexpected '
                     f'{extra[:5]}, misshapen {[(p, got[p], want[p]) for p in wrong[:5]]}.')


def init(config: kl.AutoencoderConfig, key, *, dtype='float32', batch_size: int | None = None,
         mesh: jax.sharding.Mesh | None = None) -> Autoencoder:
  """An Autoencoder with random weights: tests, training from scratch. `key`: a jax key or an int.

  PyTorch's default initialization, which diffusers' `AutoencoderKL(**config)` also has: conv and
  linear weights and biases uniform in +-1/sqrt(fan_in), GroupNorm gains 1 and offsets 0. All
  values come from one NumPy uniform draw seeded by the key's data (a jax.random draw per
  parameter would compile one program per shape: seconds for a small network on a CPU).
  """
  if isinstance(key, int):
    key = jax.random.key(key)
  if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  flat = flatten(abstract_params(config))
  total = sum(int(np.prod(a.shape)) for a in flat.values())
  rng = np.random.default_rng([int(k) for k in np.asarray(key).ravel()])
  draws = rng.uniform(-1.0, 1.0, total).astype(np.float32)
  params, offset = {}, 0
  for path, a in flat.items():
    *module, leaf = path
    siblings = {p[-1]: v for p, v in flat.items() if tuple(p[:-1]) == tuple(module)}
    size = int(np.prod(a.shape))
    if 'scale' in siblings:      # GroupNorm
      params[path] = np.full(a.shape, 1.0 if leaf == 'scale' else 0.0, np.float32)
    else:                        # conv (HWIO) or linear ([in, out]): fan_in is all but the last axis
      fan_in = int(np.prod(siblings['kernel'].shape[:-1]))
      params[path] = draws[offset:offset + size].reshape(a.shape) / np.sqrt(fan_in)
    offset += size
  return Autoencoder(config, unflatten(params), dtype=dtype, batch_size=batch_size, mesh=mesh)
