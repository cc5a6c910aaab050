"""The research API: load a trained workdir and call jitted samplers and maps.

  model = fmjax.load('runs/gmm')                  # latest checkpoint, first EMA copy
  x = model.sample(key, 1000, steps=2)            # 2-step flow-map samples
  x = model.sample(key, 64, times=[0, .5, .8, 1], labels=y, guidance_scale=2.0)
  x = model.sample(key, 10**6)                    # chunk by chunk (chunk_size=)
  y = model.flow_map(s, t, x)                     # X_{s,t}(x); s, t in [0, 1], scalars or [batch]
  b = model.velocity(t, x)                        # b_t(x) = v_{t,t}(x)
  out = model.steer(key, 256, reward, method='smc', temperature=0.5, steps=8)   # q ∝ p exp(r / 0.5)

`sample` and `steer` return host numpy arrays (float32) at every size, and cut large requests
into chunks: sample (or output row, or SMC group) i depends on (key, i) alone, never on the chunk
size, so a chunked call returns exactly the rows of one big call. Calls of more than one chunk
print one progress line per chunk (progress=False silences them).

A latent run (trained on autoencoder latents) samples images by default: the latents are
decoded by the run's autoencoder (config.autoencoder, or `load(..., autoencoder=FOLDER)` when it
moved), x = D(z / scaling_factor); `sample(..., decode=False)` returns the scaled latents.

The parameters are restored replicated over the caller's local devices (whatever they are:
one CPU, eight GPUs, ...); batches that split evenly are sharded over them. The model is
rebuilt from the config stored in the checkpoint, so no experiment file is needed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fmjax import from_config, trained_runs
from fmjax import samplers
from fmjax import sharding
from fmjax.steering import methods


# Options of Model.steer per method (beyond key, num, reward_fn, method, temperature, steps):
# a view of fmjax.steering.methods, where each method's options, defaults and checks live.
STEER_OPTIONS = {name: methods.option_names(name) + ('labels',) for name in methods.METHODS}

# Default sampling chunk: this many elements of x per chunk (2^20 floats = 4 MiB of samples).
# The network's activations, not x, bound the memory; a few hundred CIFAR-size images or a
# million 2-D points per chunk keep a U-Net or DiT far from a GPU's limit.
CHUNK_ELEMENTS = 2**20
# With decoding, a chunk also holds this many elements of decoded images (2^24 floats = 64 MiB;
# the decoder's activations at 256 x 256 are ~100 MB per image in float32).
DECODE_CHUNK_ELEMENTS = 2**24
# Default steering chunk: this many elements of x (of the N candidates per output row for
# best-of-N). Steering keeps the network's activations (and, for guidance, their backward pass)
# for every row of a chunk: about 20 kB per row of a 2-D toy with a 256-wide MLP, so 2^16
# elements (32768 2-D rows) stay near 1 GB where one call of 3e5 rows took 6.7 GB.
STEER_CHUNK_ELEMENTS = 2**16


def _count(name: str, value, minimum: int = 1) -> int:
  """A positive integer argument, or one clear error (bools and floats are not counts)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}.')
  return int(value)


def _check_grid(times, partial: bool) -> np.ndarray:
  grid = np.asarray(times, np.float64)
  if grid.ndim != 1 or grid.shape[0] < 2:
    raise ValueError('times must be a 1-D grid with at least two entries, e.g. [0.0, 0.5, 1.0].')
  if not np.all(np.isfinite(grid)) or np.any(np.diff(grid) <= 0):
    raise ValueError(f'times must increase strictly (noise at 0 -> data at 1), got {grid.tolist()}.')
  if grid[0] < 0 or grid[-1] > 1:
    raise ValueError(f'times must lie in [0, 1], got {grid.tolist()}.')
  if not partial and (grid[0] != 0 or grid[-1] != 1):
    raise ValueError(f'times must run from 0 (noise) to 1 (data), got {grid.tolist()}; pass '
                     'partial=True to start from noise at another time or stop before the data.')
  return grid


def _check_labels(labels, num: int, num_classes: int, what: str) -> np.ndarray | None:
  """labels as an int32 numpy array [num] in [0, num_classes] (num_classes: the null label),
  or one clear error."""
  if labels is None:
    return None
  if not num_classes:
    raise ValueError(f'This model is unconditional (trained without labels); call {what} without labels.')
  labels = np.asarray(labels)
  if labels.shape != (num,) or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must be integer class ids of shape [{num}], got {labels.dtype} '
                     f'{labels.shape}.')
  if labels.min() < 0 or labels.max() > num_classes:
    raise ValueError(f'labels must lie in [0, {num_classes}] ({num_classes} = no label), got '
                     f'{labels.min()} .. {labels.max()}.')
  return labels.astype(np.int32)


def _chunk_label(labels, first: int, chunk: int):
  """Rows first .. first + chunk - 1 of labels, a last short chunk padded (one compilation)."""
  if labels is None:
    return None
  return jnp.asarray(np.resize(labels[first:first + chunk], chunk), jnp.int32)


class _Progress:
  """One line per chunk on stdout for calls of more than one chunk (progress=None), so a long
  sample or steer call shows that it is alive and how far it got."""

  def __init__(self, what: str, num: int, chunk: int, progress):
    import time   # pylint: disable=import-outside-toplevel
    self._time = time.perf_counter
    self.count = -(-num // chunk)
    self.on = self.count > 1 if progress is None else bool(progress)
    self.what, self.num, self.start = what, num, self._time()

  def __call__(self, index: int, first: int, stop: int):
    if self.on:
      elapsed = self._time() - self.start
      print(f'{self.what}: chunk {index + 1}/{self.count} (rows {first}..{stop - 1} of {self.num}) '
            f'done, {elapsed:.1f} s', flush=True)


@dataclasses.dataclass
class Model:
  """A trained flow map: jitted `sample`, `flow_map` and `velocity` on the loaded parameters."""

  config: ml_collections.ConfigDict
  params: Any
  parameterization: Any       # the fmjax.flow_maps object (X, v, velocity taking params)
  example_shape: tuple[int, ...]
  num_classes: int
  step: int
  mesh: Mesh
  autoencoder: Any = None     # latent runs: the fmjax.autoencoders.Autoencoder that decodes samples
  weights: str = ''           # which parameters these are (an EMA copy and its decay, or raw), for logs

  def __post_init__(self):
    self._sample = jax.jit(self._sample_impl,
                           static_argnames=('num', 'guidance_scale', 'guidance_interval'))
    # iMF-style networks take the guidance scale as an input (one evaluation per step).
    self._guidance_input = bool(self.config.model.get('guidance_conditioning'))
    fm = self.parameterization
    self._flow_map = jax.jit(lambda p, s, t, x, labels: fm.X(p, s, t, x, labels))
    self._velocity = jax.jit(lambda p, t, x, labels: fm.velocity(p, t, x, labels))
    self._steer_cache = {}
    self._image_rewards = {}
    self._decode = None
    if self.autoencoder is not None:
      self._decode = jax.jit(self.autoencoder.decode_scaled_fn)
      self._vae_params = jax.device_put(jax.device_get(self.autoencoder.params), NamedSharding(self.mesh, P()))
      self.image_shape = tuple(jax.eval_shape(
          self._decode, self._vae_params,
          jax.ShapeDtypeStruct((1,) + self.example_shape, jnp.float32)).shape[1:])

  @property
  def is_latent(self) -> bool:
    """Whether the flow map generates autoencoder latents (decoded by `sample` by default)."""
    from fmjax.data import latents   # pylint: disable=import-outside-toplevel
    data = self.config.get('data') or {}
    return latents.is_latent_dataset(data.get('name', ''))

  # -------------------------------------------------------------- sampling

  def noise(self, key, num: int, first: int = 0) -> jax.Array:
    """The noise x0 behind `sample(key, ...)`'s samples first .. first + num - 1: row i is
    normal(fold_in(key, i)), so a sample does not depend on how a request is cut into chunks."""
    rows = first + jnp.arange(num)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), self.example_shape,
                                                jnp.float32))(rows)

  def _sample_impl(self, params, key, first, times, labels, *, num, guidance_scale,
                   guidance_interval):
    x0 = jax.lax.with_sharding_constraint(self.noise(key, num, first), self._batch_sharding(num))
    return samplers.flow_map_sample(self.parameterization, params, x0, times, labels,
                                    null_label=self.num_classes or None,
                                    guidance_scale=guidance_scale,
                                    guidance_input=self._guidance_input,
                                    guidance_interval=guidance_interval)

  def sample(self, key, num: int, steps: int = 1, *, times=None, labels=None,
             guidance_scale: float = 1.0, guidance_interval=None, partial: bool = False,
             chunk_size: int | None = None, decode: bool | None = None,
             progress: bool | None = None) -> np.ndarray:
    """`num` samples by the flow map from noise (t = 0) to data (t = 1), as a host numpy
    float32 array [num, ...] (at every size: large requests cannot live on one device).

    steps: k, for the uniform grid 0, 1/k, ..., 1 (k network evaluations);
    times: an explicit, strictly increasing grid from 0 to 1 instead (its length - 1
      evaluations); partial=True allows a grid inside [0, 1] that starts later or ends earlier;
    labels: int [num] class ids for class-conditional models (None = unconditional, i.e. the
      null label num_classes; a label equal to num_classes means the same);
    guidance_scale: classifier-free guidance weight w (1 = none): the velocity
      v_null + w (v(labels) - v_null) (Ho & Salimans 2207.12598, Eq. 6 with their w = this w - 1),
      v_null with the null label num_classes. It needs labels (an error otherwise: on an
      unconditional model, or without labels, there is nothing to guide). A network trained with
      the scale as an input (config.model.guidance_conditioning, iMF) receives it as an input
      (one evaluation per step), any other runs the conditional and the null pass;
    guidance_interval: (start, end) in fmjax time (0 noise, 1 data), where a guidance-conditioned
      network applies the scale (default (0, 1): everywhere; iMF's reference B/2 setting
      [0.4, 0.65] in its time, 1 = noise, is (0.35, 0.6) here);
    chunk_size: samples per jitted call (default: CHUNK_ELEMENTS elements of x, and
      DECODE_CHUNK_ELEMENTS of decoded images). A request larger than one chunk runs chunk by
      chunk (one compilation); sample i's noise is normal(fold_in(key, i)) (`noise`), so the
      samples are the same as in one call with the same key;
    decode: latent runs: True (default) decodes the latents to images in [-1, 1] (NHWC) with
      the run's autoencoder; False returns the latents (scaled by its scaling factor), as
      trained. Pixel and toy runs take no decoding;
    progress: one line per chunk (None: when there is more than one chunk).
    """
    num = _count('num', num)
    decode = self._check_decode(decode)
    if float(guidance_scale) != 1.0 and (not self.num_classes or labels is None):
      raise ValueError(
          f'guidance_scale = {guidance_scale} is classifier-free guidance toward labels: '
          + ('this model is unconditional (trained without labels), so it has no guidance; '
             'use guidance_scale=1.0.' if not self.num_classes else
             'pass labels (int class ids [num]) or use guidance_scale=1.0.'))
    if self._guidance_input and not float(guidance_scale) > 0:
      raise ValueError(f'guidance_scale must be > 0 for a guidance-conditioned network (it reads '
                       f'1 - 1/guidance_scale; trained on [1, omega_max]), got {guidance_scale}.')
    if guidance_interval is None:
      guidance_interval = (0.0, 1.0)
    elif not self._guidance_input:
      raise ValueError('guidance_interval is an input of guidance-conditioned networks '
                       '(config.model.guidance_conditioning); this model has none.')
    else:
      start, end = (float(a) for a in guidance_interval)
      if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f'guidance_interval must be (start, end) with 0 <= start <= end <= 1, '
                         f'got {tuple(guidance_interval)}.')
      guidance_interval = (start, end)
    if times is None:
      times = samplers.uniform_grid(_count('steps', steps))
    times = jnp.asarray(_check_grid(times, partial), jnp.float32)
    labels = _check_labels(labels, num, self.num_classes, 'sample')
    default_chunk = max(1, CHUNK_ELEMENTS // int(np.prod(self.example_shape)))
    if decode:
      default_chunk = min(default_chunk, max(1, DECODE_CHUNK_ELEMENTS // int(np.prod(self.image_shape))))
    chunk = min(num, _count('chunk_size', chunk_size) if chunk_size is not None else default_chunk)
    chunk += (-chunk) % self.mesh.size if chunk > self.mesh.size else 0   # split evenly over devices

    out = np.empty((num,) + (self.image_shape if decode else self.example_shape), np.float32)
    report = _Progress('sample', num, chunk, progress)
    for index, first in enumerate(range(0, num, chunk)):
      # A last, short chunk is padded to the chunk size (one compilation); noise and labels
      # are taken by row: rows first .. first + chunk - 1.
      x = self._sample(self.params, key, first, times, _chunk_label(labels, first, chunk),
                       num=chunk, guidance_scale=float(guidance_scale),
                       guidance_interval=guidance_interval)
      if decode:
        x = self._decode(self._vae_params, x)
      stop = min(first + chunk, num)
      out[first:stop] = np.asarray(x[:stop - first])
      report(index, first, stop)
    return out

  def _check_decode(self, decode) -> bool:
    if decode is None:
      decode = self.is_latent
    if not decode:
      return False
    if not self.is_latent:
      raise ValueError(f'decode=True: this run trains on {self.config.data.name!r}, not on '
                       'autoencoder latents; there is nothing to decode.')
    if self.autoencoder is None:
      raise ValueError(
          f'This run generates latents of {self.config.data.name!r} but has no autoencoder to '
          'decode them (its config.autoencoder is empty): load it with '
          'fmjax.load(DIR, autoencoder=FOLDER), or pass decode=False for the latents.')
    return True

  def decode(self, latents) -> jax.Array:
    """Images in [-1, 1] from latents as the flow map generates them (scaled), x = D(z / scale)."""
    self._check_decode(True)
    return self._decode(self._vae_params, self._check_x(latents))

  # -------------------------------------------------------------- steering

  def steer(self, key, num: int, reward_fn, method: str = 'guidance', temperature: float = 1.0,
            steps: int = 8, decode: bool | None = None, *, chunk_size: int | None = None,
            progress: bool | None = None, **options):
    """`num` samples steered toward q ∝ p exp(reward_fn(x) / temperature) (fmjax.steering).

    reward_fn(x, labels) -> [batch] floats (e.g. fmjax.steering.rewards.quadratic(c, std)).
    method: a name in fmjax.steering.methods.METHODS (each method's options dataclass holds
      its options, their defaults and checks): 'best_of_n' (options num_particles = N = 8
      candidates per output row, select =
      'importance' | 'argmax'; steps: the base sampler's flow-map steps; `n` is accepted as the
      old name of num_particles), 'guidance' (fmjax.steering.reward_guidance.guided_sample: lookahead,
      keep_jacobian, guidance_scale, guidance_stop, schedule, transport, times) or 'smc'
      (fmjax.steering.smc.smc_sample: num_particles = 8 and the same guidance options,
      ess_threshold, ...; num must be a multiple of num_particles); labels: int [num] class ids
      for conditional models (None: the null label).
    decode: latent runs: True (default) judges and returns decoded images, i.e. the reward sees
      x = D(z / scaling_factor) (differentiated through the decoder where the method needs the
      gradient); False steers and returns the latents themselves.
    chunk_size: output rows per jitted call (default: STEER_CHUNK_ELEMENTS elements of x, of
      the N candidates for best-of-N; rounded to whole SMC groups). The randomness is by row:
      guidance starts row i from `noise(split(key)[0], ...)` row i; best-of-N's candidate j of
      row i is noise row i N + j and row i's pick uses fold_in(split(key)[1], i); SMC group g
      (rows g P .. g P + P - 1) runs with fold_in(split(key)[1], g). So a chunked call returns
      the rows of one big call, and each group's resampling is the same in both.
    progress: one line per chunk (None: when there is more than one chunk).
    Returns a SteerResult(samples, log_weights, ess, nfe) of host numpy arrays: samples [num, ...],
    log_weights [num] (smc) or None, ess averaged over output rows (best_of_n, [1]) or over
    groups (smc, [steps + 1]) or None, nfe per sample, and for smc with labels each returned
    row's label (its ancestor's: resampling moves rows within a group). A reward that is NaN or
    +inf for any row, or -inf for every particle/candidate of a group (a hard constraint nothing
    satisfies), raises one ValueError naming the method and the counts. One compilation per
    (chunk, reward_fn, method, options).
    """
    num, steps = _count('num', num), _count('steps', steps)
    labels = _check_labels(options.pop('labels', None), num, self.num_classes, 'steer')
    spec, options = self._steer_options(method, temperature, options)
    if not callable(reward_fn):
      raise ValueError('reward_fn must be a callable r(x, labels) -> [batch] floats.')
    decode = self._check_decode(decode)
    from fmjax.steering import rewards
    rewards.check_reward(reward_fn, jax.ShapeDtypeStruct(
        (num,) + (self.image_shape if decode else self.example_shape), jnp.float32),
        None if labels is None else jnp.asarray(labels))
    if decode:
      reward_fn = self._on_images(reward_fn)
    group = options.group
    if num % group:
      raise ValueError(f'num = {num} must be a multiple of num_particles = {group} ({method} '
                       'resamples within groups).')
    per_row = int(np.prod(self.example_shape)) * options.draws_per_row
    chunk = (_count('chunk_size', chunk_size) if chunk_size is not None
             else max(1, STEER_CHUNK_ELEMENTS // per_row))
    chunk = max(group, min(chunk, num) // group * group)   # whole SMC groups
    cache_key = (chunk, reward_fn, method, steps, options)
    if cache_key not in self._steer_cache:
      self._steer_cache[cache_key] = self._steer_fn(spec.run, chunk, reward_fn, steps, options)
    fn, nfe = self._steer_cache[cache_key]
    key_noise, key_run = jax.random.split(key)
    shape = self.image_shape if decode else self.example_shape
    samples = np.empty((num,) + shape, np.float32)
    log_weights = out_labels = None   # allocated when the method returns them (smc)
    ess = []   # per output row (best_of_n) or per group (smc), padding dropped
    check = np.zeros(4, np.int64)   # reward counts of the real rows: NaN/+inf rows, rows, empty groups, groups
    report = _Progress(f'steer ({method})', num, chunk, progress)
    for index, first in enumerate(range(0, num, chunk)):
      x, log_w, ess_chunk, labels_chunk, check_chunk = fn(self.params, key_noise, key_run, first,
                                                          _chunk_label(labels, first, chunk))
      if decode:
        x = self._decode(self._vae_params, x)
      stop = min(first + chunk, num)
      samples[first:stop] = np.asarray(x[:stop - first])
      if log_w is not None:
        log_weights = np.empty((num,), np.float32) if log_weights is None else log_weights
        log_weights[first:stop] = np.asarray(log_w[:stop - first])
      if ess_chunk is not None:
        ess.append(np.asarray(ess_chunk)[:(stop - first) // group])
      if labels_chunk is not None:   # smc moves rows between particles: each row's ancestor's label
        out_labels = np.empty((num,), np.int32) if out_labels is None else out_labels
        out_labels[first:stop] = np.asarray(labels_chunk[:stop - first])
      # per output row (best_of_n, guidance) or group (smc); the last chunk's padding left out
      check += np.asarray(check_chunk, np.int64)[:-(-(stop - first) // group)].sum(axis=0)
      report(index, first, stop)
    ess = np.concatenate(ess).mean(axis=0, dtype=np.float64).astype(np.float32) if ess else None
    if ess is not None and ess.ndim == 0:
      ess = ess[None]
    from fmjax.steering.result import SteerResult, raise_on_bad_rewards
    raise_on_bad_rewards(method, check)   # NaN / +inf rewards, or groups with no finite reward
    # nfe: a Python int, recorded while tracing
    return SteerResult(samples, log_weights, ess, nfe[0], out_labels)

  @staticmethod
  def _steer_options(method: str, temperature, options: dict):
    """(the method's MethodSpec, its options dataclass built from temperature and **options),
    or one clear error: an unknown method or option name, or a bad value."""
    if method not in methods.METHODS:
      raise ValueError(f'unknown steering method {method!r}; choose one of {tuple(methods.METHODS)}.')
    spec = methods.METHODS[method]
    for old, new in spec.old_names.items():
      if old in options:
        if new in options:
          raise ValueError(f'{method}: pass {new} once ({old} is its old name).')
        options[new] = options.pop(old)
    allowed = methods.option_names(method) + ('labels',)   # a method registered later counts too
    unknown = sorted(set(options) - set(allowed))
    if unknown:
      raise ValueError(f'method={method!r} takes no option(s) {unknown}; it takes {allowed}.')
    return spec, spec.options(temperature=temperature, **options)

  def _on_images(self, reward_fn):
    """reward_fn of decoded images as a reward of latents, one wrapper per reward_fn (so the
    steering cache keeps hitting)."""
    if reward_fn not in self._image_rewards:
      decode, vae_params = self.autoencoder.decode_scaled_fn, self._vae_params
      self._image_rewards[reward_fn] = (
          lambda z, labels=None: reward_fn(decode(vae_params, z), labels))
    return self._image_rewards[reward_fn]

  def _steer_fn(self, run_method, chunk, reward_fn, steps, options):
    """(a jitted (params, key_noise, key_run, first, labels) -> (samples, log_weights, ess per
    output row or group, smc's moved labels, reward counts per output row or group) of rows
    first .. first + chunk - 1 by the method's runner (methods.MethodSpec.run), its NFE per
    sample)."""
    from fmjax import interpolants
    fm = self.parameterization
    interpolant = interpolants.get(self.config.interpolant)
    nfe = []

    def run(params, key_noise, key_run, first, labels):
      pieces = methods.ModelPieces(
          flow_map=lambda s, t, x, y=None: fm.X(params, s, t, x, y),
          velocity=lambda t, x, y=None: fm.velocity(params, t, x, y),
          sample=lambda x0, k, y=None: samplers.flow_map_sample(fm, params, x0,
                                                                samplers.uniform_grid(k), y),
          noise=self.noise, interpolant=interpolant)
      out = run_method(pieces, key_noise, key_run, first, chunk, labels, reward=reward_fn,
                     steps=steps, options=options)
      nfe.append(out.nfe)
      return out.samples, out.log_weights, out.ess, out.labels, out.check

    return jax.jit(run), nfe

  # -------------------------------------------------------------- maps

  def velocity_fn(self):
    """b(t, x, labels=None) with the loaded parameters closed over (e.g. a distillation teacher)."""
    params, fm = self.params, self.parameterization
    return lambda t, x, labels=None: fm.velocity(params, t, x, labels)

  def _times(self, t, x, name='t'):
    if not isinstance(t, jax.core.Tracer):   # concrete times: checked (traced ones pass as given)
      values = np.asarray(t, np.float64)
      if not np.all((values >= 0) & (values <= 1)):
        raise ValueError(f'{name} must lie in [0, 1] (0 noise, 1 data), got '
                         f'{values.min() if values.size else values} .. {values.max() if values.size else values}.')
    t = jnp.asarray(t, jnp.float32)
    if t.ndim == 0:
      return jnp.full((x.shape[0],), t)
    if t.shape != (x.shape[0],):
      raise ValueError(f'times must be scalars or of shape [batch] = [{x.shape[0]}], got {t.shape}.')
    return t

  def _check_x(self, x):
    x = jnp.asarray(x, jnp.float32)
    if tuple(x.shape[1:]) != self.example_shape:
      raise ValueError(f'x must have shape [batch, {", ".join(map(str, self.example_shape))}], '
                       f'got {tuple(x.shape)}.')
    return x

  def _batch_sharding(self, num):
    return NamedSharding(self.mesh, P('batch') if num % self.mesh.size == 0 else P())

  def _map_labels(self, labels, x):
    labels = _check_labels(labels, x.shape[0], self.num_classes, 'flow_map / velocity')
    return None if labels is None else jnp.asarray(labels)

  def flow_map(self, s, t, x, labels=None) -> jax.Array:
    """X_{s,t}(x): the point at time t on the path through x at time s (s, t in [0, 1], scalars
    or [batch]; t < s maps back toward the noise). labels: int [batch] or None (null label)."""
    x = self._check_x(x)
    return self._flow_map(self.params, self._times(s, x, 's'), self._times(t, x, 't'), x,
                          self._map_labels(labels, x))

  def velocity(self, t, x, labels=None) -> jax.Array:
    """b_t(x) = v_{t,t}(x), the instantaneous velocity of the probability-flow ODE (t in [0, 1])."""
    x = self._check_x(x)
    return self._velocity(self.params, self._times(t, x), x, self._map_labels(labels, x))


def load(workdir: str, step: int | None = None, *, ema: int | None = None,
         autoencoder: str | None = None, decode_dtype: str = 'float32') -> Model:
  """Loads a trained workdir: the checkpoint at `step` (latest if None).

  Which weights: by default (ema=None) the first EMA copy, the exponential moving average of
  the training parameters with decay config.optim.ema_decays[0] (e.g. 0.999; the raw parameters
  of a run that keeps no EMA). An EMA of decay d averages over about 1 / (1 - d) updates, so
  after a short run or fine-tune (a few hundred steps at 0.999) it still sits near where
  training started: pass ema=-1 for the raw training parameters, or ema=i for the i-th decay of
  config.optim.ema_decays. --mode=sample, --mode=steer and --mode=eval load the same default;
  the returned model's `weights` names the choice.
  ema: which EMA copy of the parameters (config.optim.ema_decays order); -1 for the raw
  training parameters; None (default) for the first EMA copy, or the raw parameters of a
  run that keeps none.
  autoencoder: latent runs: the VAE folder that decodes samples (default: the run's
  config.autoencoder); it must be the one that encoded the training latents (digest checked).
  decode_dtype: the decoder's compute dtype, 'float32' or 'bfloat16'.
  """
  trained = trained_runs.load_trained(workdir, step, ema)
  config = trained.config
  vae = None
  folder = autoencoder if autoencoder is not None else config.get('autoencoder', '')
  if folder:
    with config.unlocked():
      config.autoencoder = folder
    vae = from_config.load_autoencoder(config, decode_dtype)
    from_config.check_autoencoder(vae, trained.latent_info, f'the training latents of {workdir}')
  return Model(config, trained.params, trained.flow_map, trained.example_shape,
               trained.num_classes, trained.step, sharding.local_mesh(), vae,
               getattr(trained, 'weights', ''))
