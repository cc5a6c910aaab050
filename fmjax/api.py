"""The research API: load a trained workdir and call jitted samplers and maps.

  model = fmjax.load('runs/gmm')                  # latest checkpoint, first EMA copy
  x = model.sample(key, 1000, steps=2)            # 2-step flow-map samples
  x = model.sample(key, 64, times=[0, .5, .8, 1], labels=y, guidance_scale=2.0)
  x = model.sample(key, 10**6)                    # chunk by chunk (chunk_size=), a host array
  y = model.flow_map(s, t, x)                     # X_{s,t}(x); s, t scalars or [batch]
  b = model.velocity(t, x)                        # b_t(x) = v_{t,t}(x)
  out = model.steer(key, 256, reward, method='smc', temperature=0.5, steps=8)   # q ∝ p exp(r / 0.5)

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

from fmjax import build
from fmjax import samplers
from fmjax import sharding


# Options of Model.steer per method (beyond key, num, reward_fn, method, temperature, steps).
STEER_OPTIONS = {
    'best_of_n': ('n', 'select', 'labels'),
    'guidance': ('lookahead', 'keep_jacobian', 'guidance_scale', 'guidance_stop', 'schedule',
                 'transport', 'times', 'labels'),
    'smc': ('num_particles', 'lookahead', 'keep_jacobian', 'guidance_scale', 'guidance_stop',
            'schedule', 'ess_threshold', 'noise', 'transport', 'final_resample', 'times', 'labels'),
}

# Default sampling chunk: this many elements of x per chunk (2^20 floats = 4 MiB of samples).
# The network's activations, not x, bound the memory; a few hundred CIFAR-size images or a
# million 2-D points per chunk keep a U-Net or DiT far from a GPU's limit.
CHUNK_ELEMENTS = 2**20
# With decoding, a chunk also holds this many elements of decoded images (2^24 floats = 64 MiB;
# the decoder's activations at 256 x 256 are ~100 MB per image in float32).
DECODE_CHUNK_ELEMENTS = 2**24


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
             chunk_size: int | None = None, decode: bool | None = None):
    """`num` samples by the flow map from noise (t = 0) to data (t = 1).

    steps: k, for the uniform grid 0, 1/k, ..., 1 (k network evaluations);
    times: an explicit, strictly increasing grid from 0 to 1 instead (its length - 1
      evaluations); partial=True allows a grid inside [0, 1] that starts later or ends earlier;
    labels: int [num] class ids for class-conditional models (None = unconditional);
    guidance_scale: classifier-free guidance weight (1 = none); a network trained with the
      scale as an input (config.model.guidance_conditioning, iMF) receives it as an input (one
      evaluation per step), any other runs the conditional and the null pass;
    guidance_interval: (start, end) in fmjax time (0 noise, 1 data), where a guidance-conditioned
      network applies the scale (default (0, 1): everywhere; iMF's reference B/2 setting
      [0.4, 0.65] in its time, 1 = noise, is (0.35, 0.6) here);
    chunk_size: samples per jitted call (default: CHUNK_ELEMENTS elements of x, and
      DECODE_CHUNK_ELEMENTS of decoded images). A request larger than one chunk runs chunk by
      chunk (one compilation) and comes back as a host numpy array; the samples are the same as
      in one call with the same key;
    decode: latent runs: True (default) decodes the latents to images in [-1, 1] (NHWC) with
      the run's autoencoder; False returns the latents (scaled by its scaling factor), as
      trained. Pixel and toy runs take no decoding.
    """
    num = _count('num', num)
    decode = self._check_decode(decode)
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
    if labels is not None:
      if not self.num_classes:
        raise ValueError('This model is unconditional; call sample without labels.')
      labels = np.asarray(labels)
      if labels.shape != (num,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f'labels must be integer class ids of shape [{num}], got {labels.dtype} '
                         f'{labels.shape}.')
      if labels.min() < 0 or labels.max() > self.num_classes:
        raise ValueError(f'labels must lie in [0, {self.num_classes}] ({self.num_classes} = no '
                         f'label), got {labels.min()} .. {labels.max()}.')
    default_chunk = max(1, CHUNK_ELEMENTS // int(np.prod(self.example_shape)))
    if decode:
      default_chunk = min(default_chunk, max(1, DECODE_CHUNK_ELEMENTS // int(np.prod(self.image_shape))))
    chunk = min(num, _count('chunk_size', chunk_size) if chunk_size is not None else default_chunk)
    chunk += (-chunk) % self.mesh.size if chunk > self.mesh.size else 0   # split evenly over devices

    def run(first):
      y = None
      if labels is not None:   # a last, short chunk is padded to the chunk size (one compilation)
        y = jnp.asarray(np.resize(labels[first:first + chunk], chunk), jnp.int32)
      x = self._sample(self.params, key, first, times, y, num=chunk,
                       guidance_scale=float(guidance_scale), guidance_interval=guidance_interval)
      if decode:
        x = self._decode(self._vae_params, x)
      return x[:num - first]

    if chunk >= num:
      return run(0)
    out = np.empty((num,) + (self.image_shape if decode else self.example_shape), np.float32)
    for first in range(0, num, chunk):
      out[first:first + chunk] = np.asarray(run(first))
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
            steps: int = 8, decode: bool | None = None, **options):
    """`num` samples steered toward q ∝ p exp(reward_fn(x) / temperature) (fmjax.steering).

    reward_fn(x, labels) -> [batch] floats (e.g. fmjax.steering.rewards.quadratic(c, std)).
    method: 'best_of_n' (options n = 8, select = 'importance' | 'argmax'; steps: the base
      sampler's flow-map steps), 'guidance' (fmjax.steering.guidance.guided_sample: lookahead,
      keep_jacobian, guidance_scale, guidance_stop, schedule, transport, times) or 'smc'
      (fmjax.steering.smc.smc_sample: num_particles = 8 and the same guidance options,
      ess_threshold, ...; num must be a multiple of num_particles); labels for conditional models.
    decode: latent runs: True (default) judges and returns decoded images, i.e. the reward sees
      x = D(z / scaling_factor) (differentiated through the decoder where the method needs the
      gradient); False steers and returns the latents themselves.
    Returns a SteerResult(samples, log_weights, ess, nfe); one compilation per (num, reward_fn,
    method, options).
    """
    num, steps = _count('num', num), _count('steps', steps)
    if method not in STEER_OPTIONS:
      raise ValueError(f'unknown steering method {method!r}; choose one of {tuple(STEER_OPTIONS)}.')
    unknown = sorted(set(options) - set(STEER_OPTIONS[method]))
    if unknown:
      raise ValueError(f'method={method!r} takes no option(s) {unknown}; it takes '
                       f'{STEER_OPTIONS[method]}.')
    if isinstance(temperature, bool) or not float(temperature) > 0:
      raise ValueError(f'temperature must be a positive number, got {temperature!r}.')
    labels = options.pop('labels', None)
    if labels is not None:
      if not self.num_classes:
        raise ValueError('This model is unconditional; call steer without labels.')
      labels = jnp.asarray(labels, jnp.int32)
      if labels.shape != (num,):
        raise ValueError(f'labels must be integer class ids of shape [{num}], got {labels.shape}.')
    if not callable(reward_fn):
      raise ValueError('reward_fn must be a callable r(x, labels) -> [batch] floats.')
    decode = self._check_decode(decode)
    from fmjax.steering import rewards
    rewards.check_reward(reward_fn, jax.ShapeDtypeStruct(
        (num,) + (self.image_shape if decode else self.example_shape), jnp.float32), labels)
    if decode:
      reward_fn = self._on_images(reward_fn)
    if method == 'smc':
      options.setdefault('num_particles', 8)
      _count('num_particles', options['num_particles'])
      if num % options['num_particles']:
        raise ValueError(f'num = {num} must be a multiple of num_particles = '
                         f'{options["num_particles"]} (smc resamples within groups).')
    if method == 'best_of_n':
      options.setdefault('n', 8)
      _count('n', options['n'])
    if options.get('times') is not None:
      options['times'] = tuple(float(t) for t in _check_grid(options['times'], False))
    cache_key = (num, reward_fn, method, float(temperature), steps, tuple(sorted(options.items())))
    if cache_key not in self._steer_cache:
      self._steer_cache[cache_key] = self._steer_fn(*cache_key)
    fn, nfe = self._steer_cache[cache_key]
    from fmjax.steering.result import SteerResult
    samples, log_weights, ess = fn(self.params, key, labels)
    if decode:
      samples = self._decode(self._vae_params, samples)
    return SteerResult(samples, log_weights, ess, nfe[0])   # nfe: a Python int, recorded while tracing

  def _on_images(self, reward_fn):
    """reward_fn of decoded images as a reward of latents, one wrapper per reward_fn (so the
    steering cache keeps hitting)."""
    if reward_fn not in self._image_rewards:
      decode, vae_params = self.autoencoder.decode_scaled_fn, self._vae_params
      self._image_rewards[reward_fn] = (
          lambda z, labels=None: reward_fn(decode(vae_params, z), labels))
    return self._image_rewards[reward_fn]

  def _steer_fn(self, num, reward_fn, method, temperature, steps, options):
    """(a jitted (params, key, labels) -> (samples, log_weights, ess), its NFE per sample)."""
    from fmjax import interpolants
    from fmjax.steering import guidance
    options = dict(options)
    fm = self.parameterization
    interpolant = interpolants.get(self.config.interpolant)
    nfe = []

    def run(params, key, labels):
      options_ = dict(options)
      flow_map = lambda s, t, x, y=None: fm.X(params, s, t, x, y)
      velocity = lambda t, x, y=None: fm.velocity(params, t, x, y)
      key_noise, key_run = jax.random.split(key)
      if method == 'best_of_n':
        grid = samplers.uniform_grid(steps)
        sample_fn = lambda k, count, y: samplers.flow_map_sample(fm, params, self.noise(k, count),
                                                                 grid, y)
        out = guidance.best_of_n(key_run, sample_fn, reward_fn, num, options_['n'],
                                 temperature=temperature, select=options_.get('select', 'importance'),
                                 labels=labels, base_nfe=steps)
      elif method == 'guidance':
        times = options_.pop('times', None) or tuple(np.linspace(0.0, 1.0, steps + 1).tolist())
        out = guidance.guided_sample(self.noise(key_noise, num), flow_map=flow_map,
                                     velocity=velocity, interpolant=interpolant, reward=reward_fn,
                                     temperature=temperature, times=times, labels=labels, **options_)
      else:
        from fmjax.steering import smc   # helper module of issue 10, imported when used
        out = smc.smc_sample(key_run, self.noise(key_noise, num), flow_map=flow_map,
                             velocity=velocity, interpolant=interpolant, reward=reward_fn,
                             temperature=temperature, num_steps=steps, labels=labels, **options_)
      nfe.append(int(out.nfe))
      return out.samples, out.log_weights, out.ess

    jitted = jax.jit(run)
    return jitted, nfe


  # -------------------------------------------------------------- maps

  def velocity_fn(self):
    """b(t, x, labels=None) with the loaded parameters closed over (e.g. a distillation teacher)."""
    params, fm = self.params, self.parameterization
    return lambda t, x, labels=None: fm.velocity(params, t, x, labels)

  def _times(self, t, x):
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

  def flow_map(self, s, t, x, labels=None) -> jax.Array:
    """X_{s,t}(x): the point at time t on the path through x at time s."""
    x = self._check_x(x)
    return self._flow_map(self.params, self._times(s, x), self._times(t, x), x, labels)

  def velocity(self, t, x, labels=None) -> jax.Array:
    """b_t(x) = v_{t,t}(x), the instantaneous velocity of the probability-flow ODE."""
    x = self._check_x(x)
    return self._velocity(self.params, self._times(t, x), x, labels)


def load(workdir: str, step: int | None = None, *, ema: int | None = None,
         autoencoder: str | None = None, decode_dtype: str = 'float32') -> Model:
  """Loads a trained workdir: the checkpoint at `step` (latest if None).

  ema: which EMA copy of the parameters (config.optim.ema_decays order); -1 for the raw
  training parameters; None (default) for the first EMA copy, or the raw parameters of a
  run that keeps none.
  autoencoder: latent runs: the VAE folder that decodes samples (default: the run's
  config.autoencoder); it must be the one that encoded the training latents (digest checked).
  decode_dtype: the decoder's compute dtype, 'float32' or 'bfloat16'.
  """
  trained = build.load_trained(workdir, step, ema)
  config = trained.config
  vae = None
  folder = autoencoder if autoencoder is not None else config.get('autoencoder', '')
  if folder:
    with config.unlocked():
      config.autoencoder = folder
    vae = build.load_autoencoder(config, decode_dtype)
    build.check_autoencoder(vae, trained.latent_info, f'the training latents of {workdir}')
  return Model(config, trained.params, trained.flow_map, trained.example_shape,
               trained.num_classes, trained.step, sharding.local_mesh(), vae)
