"""The steering methods: one registry, one options dataclass per method.

A method is a `MethodSpec` in `METHODS`: its options (a frozen dataclass whose fields are the
method's options with their defaults, checked in `__post_init__`: one ValueError each, worded
'NAME = VALUE ...' so config.steer can prefix it) and its runner, which steers one chunk of rows
inside jit. `fmjax.api.Model.steer` looks a method up here, config.steer's method fields are
the dataclasses' fields (`config_fields`), and the samplers of best_of_n / guided_sample /
smc_sample check their options by building the same dataclasses, so every option is checked in
one place.

The randomness is by row (as `Model.steer` documents): guidance starts row i from noise row i;
best-of-N's candidate j of output row i is noise row i N + j and row i's pick uses
fold_in(key_run, i); SMC group g (rows g P .. g P + P - 1) runs with fold_in(key_run, g). So a
chunk's rows do not depend on where the chunk starts, and chunked calls equal one big call.

This module imports only fmjax.steering modules (the samplers when a runner runs), so the config
layer can import it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.steering.lookahead import LOOKAHEADS

SELECTIONS = ('argmax', 'importance')   # best-of-N: the best candidate, or one drawn by weight
SCHEDULES = ('constant', 'linear')      # guidance strength over time (reward_guidance.strength)
TRANSPORTS = ('flow_map', 'euler')      # flow-map jumps, or Euler steps on the velocity


def _api_only(default):
  """A field of Model.steer that config.steer does not carry (its run folders keep their names)."""
  return dataclasses.field(default=default, metadata={'config': False})


def _real(name: str, value, requirement: str) -> float:
  """value as a Python float, or one error (bools and strings are not numbers)."""
  try:
    if isinstance(value, bool):
      raise TypeError
    return float(value)
  except (TypeError, ValueError):
    raise ValueError(f'{name} = {value!r} must be a number {requirement}.') from None


def _choice(name: str, value, names: tuple, what: str) -> None:
  if value not in names:
    raise ValueError(f'{name} = {value!r}: unknown {what}; choose one of {names}.')


def _set(options, name: str, value) -> None:
  object.__setattr__(options, name, value)   # normalizing a field of a frozen dataclass


@dataclasses.dataclass(frozen=True)
class SteeringOptions:
  """What every method takes: the temperature lambda of q ∝ p exp(r / lambda)."""

  temperature: float = 1.0

  def __post_init__(self):
    value = _real('temperature', self.temperature, '> 0')
    if not (value > 0 and np.isfinite(value)):
      raise ValueError(f'temperature = {self.temperature!r} must be > 0 (temperature must be a '
                       'positive number: the lambda of q ∝ p exp(r / lambda)).')
    _set(self, 'temperature', value)

  @property
  def group(self) -> int:
    """Rows that steer together (SMC resamples within groups): a chunk holds whole groups."""
    return 1

  @property
  def draws_per_row(self) -> int:
    """Base samples drawn per output row (best-of-N's N): it sizes the default chunk."""
    return 1


@dataclasses.dataclass(frozen=True)
class BestOfNOptions(SteeringOptions):
  """Best-of-N (fmjax.steering.selection.best_of_n): N = num_particles base samples per output
  row, one kept by `select` ('importance': drawn ∝ exp(r / lambda), tends to q; 'argmax')."""

  num_particles: int = 8
  select: str = 'importance'

  def __post_init__(self):
    super().__post_init__()
    _set(self, 'num_particles', _check_count('num_particles', self.num_particles))
    _choice('select', self.select, SELECTIONS, 'best-of-N selection')

  @property
  def draws_per_row(self) -> int:
    return self.num_particles


@dataclasses.dataclass(frozen=True)
class GuidanceOptions(SteeringOptions):
  """Look-ahead reward-gradient guidance (fmjax.steering.reward_guidance.guided_sample).

  lookahead: lookahead.LOOKAHEADS; keep_jacobian: differentiate through the look-ahead (False:
  cheaper, biased); guidance_scale multiplies the control; guidance_stop: no guidance at times
  >= this; schedule: SCHEDULES ('linear': strength 1 - t); transport: TRANSPORTS; times: an
  increasing grid from 0 to 1 instead of the uniform one of `steps`."""

  lookahead: str = 'flow_map'
  keep_jacobian: bool = True
  guidance_scale: float = 1.0
  guidance_stop: float = 1.0
  schedule: str = 'constant'
  transport: str = _api_only('flow_map')
  times: Optional[tuple] = _api_only(None)

  def __post_init__(self):
    super().__post_init__()
    _choice('lookahead', self.lookahead, LOOKAHEADS, 'look-ahead')
    _choice('schedule', self.schedule, SCHEDULES, 'guidance schedule')
    _choice('transport', self.transport, TRANSPORTS, 'transport')
    _set(self, 'keep_jacobian', bool(self.keep_jacobian))
    scale = _real('guidance_scale', self.guidance_scale, '(the control\'s multiplier)')
    if not np.isfinite(scale):
      raise ValueError(f'guidance_scale = {self.guidance_scale!r} must be a finite number.')
    _set(self, 'guidance_scale', scale)
    stop = _real('guidance_stop', self.guidance_stop, 'in [0, 1]')
    if not 0.0 <= stop <= 1.0:
      raise ValueError(f'guidance_stop = {self.guidance_stop!r} must be a time in [0, 1].')
    _set(self, 'guidance_stop', stop)
    if self.times is not None:
      _set(self, 'times', _check_times(self.times))


@dataclasses.dataclass(frozen=True)
class SMCOptions(GuidanceOptions):
  """Twisted SMC (fmjax.steering.smc.smc_sample): the guidance options for its proposal, groups
  of num_particles rows resampled when their ESS falls below ess_threshold * num_particles,
  noise the eps_t scale of its SDE, final_resample by the final weights."""

  num_particles: int = 8
  ess_threshold: float = 0.5
  noise: float = _api_only(0.5)
  final_resample: bool = _api_only(True)

  def __post_init__(self):
    super().__post_init__()
    _set(self, 'num_particles', _check_count('num_particles', self.num_particles))
    threshold = _real('ess_threshold', self.ess_threshold, 'in [0, 1]')
    if not 0.0 <= threshold <= 1.0:
      raise ValueError(f'ess_threshold = {self.ess_threshold!r} must be in [0, 1] (a fraction of '
                       'the particles).')
    _set(self, 'ess_threshold', threshold)
    noise = _real('noise', self.noise, '>= 0')
    if not noise >= 0:
      raise ValueError(f'noise = {self.noise!r} (the eps_t scale) must be >= 0.')
    _set(self, 'noise', noise)
    _set(self, 'final_resample', bool(self.final_resample))

  @property
  def group(self) -> int:
    return self.num_particles


def _check_count(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f'{name} = {value!r} must be an integer >= 1.')
  return int(value)


def _check_times(times) -> tuple:
  grid = np.asarray(times, np.float64)
  if (grid.ndim != 1 or grid.shape[0] < 2 or not np.all(np.isfinite(grid))
      or np.any(np.diff(grid) <= 0) or grid[0] != 0 or grid[-1] != 1):
    raise ValueError(f'times = {times!r} must be a grid that increases strictly from 0 (noise) to '
                     '1 (data), e.g. (0.0, 0.5, 1.0).')
  return tuple(float(t) for t in grid)


# ------------------------------------------------------------------ runners


class ModelPieces(NamedTuple):
  """What a runner needs of the loaded model (parameters closed over; inside jit)."""

  flow_map: Callable      # (s, t, x, labels) -> X_{s,t}(x)
  velocity: Callable      # (t, x, labels) -> b_t(x)
  sample: Callable        # (x0, steps, labels) -> the plain `steps`-step flow-map samples of x0
  noise: Callable         # (key, count, first) -> noise rows first .. first + count - 1
  interpolant: Any


class Steered(NamedTuple):
  """One chunk of rows, steered: samples [chunk, ...]; log_weights [chunk] or None; ess per
  output row or group, or None; labels [chunk] where rows moved (SMC), else None; check: the
  reward counts (fmjax.steering.result.reward_check) per output row or group [units, 4]; nfe:
  network evaluations per returned sample (a Python int, known while tracing)."""

  samples: jax.Array
  log_weights: Optional[jax.Array]
  ess: Optional[jax.Array]
  labels: Optional[jax.Array]
  check: jax.Array
  nfe: int


def counts_of(out) -> jax.Array:
  """A steering result's reward counts (result.reward_check), zeros if it has none."""
  return (jnp.zeros(4, jnp.int32) if out.reward_check is None
          else jnp.asarray(out.reward_check, jnp.int32))


def per_unit(fn, first_unit, units: int, labels, width: int):
  """fn(unit index, labels of the unit or None) vmapped over `units` consecutive units (output
  rows or SMC groups) of `width` rows: each unit's randomness is its own."""
  index = first_unit + jnp.arange(units)
  if labels is None:
    return jax.vmap(lambda i: fn(i, None))(index)
  return jax.vmap(fn)(index, labels.reshape(units, width))


def run_best_of_n(pieces, key_noise, key_run, first, chunk, labels, *, reward, steps,
                  options: BestOfNOptions) -> Steered:
  """Output row i: the pick among noise rows i N .. i N + N - 1, with fold_in(key_run, i)."""
  from fmjax.steering import selection   # pylint: disable=import-outside-toplevel
  n, nfe = options.num_particles, []

  def one_row(i, y):   # output row i: candidates i n .. i n + n - 1 of the noise stream
    sample_fn = lambda k, count, yy: pieces.sample(pieces.noise(key_noise, count, i * n), steps, yy)
    out = selection.best_of_n(jax.random.fold_in(key_run, i), sample_fn, reward, 1, n,
                              temperature=options.temperature, select=options.select,
                              labels=y, base_nfe=steps)   # y: row i's label, shape [1]
    nfe.append(int(out.nfe))
    return out.samples[0], out.ess[0], counts_of(out)

  x, ess, check = per_unit(one_row, first, chunk, labels, 1)
  return Steered(x, None, ess, None, check, nfe[0])


def run_guidance(pieces, key_noise, key_run, first, chunk, labels, *, reward, steps,
                 options: GuidanceOptions) -> Steered:
  """Row i: guided from noise row i (no other randomness)."""
  del key_run   # deterministic given the noise
  from fmjax.steering import reward_guidance   # pylint: disable=import-outside-toplevel
  times = options.times or tuple(np.linspace(0.0, 1.0, steps + 1).tolist())
  out = reward_guidance.guided_sample(
      pieces.noise(key_noise, chunk, first), flow_map=pieces.flow_map, velocity=pieces.velocity,
      interpolant=pieces.interpolant, reward=reward, labels=labels,
      **{**dataclasses.asdict(options), 'times': times})
  # guided_sample counts the whole chunk at once: its counts sit on the chunk's first row
  check = jnp.zeros((chunk, 4), jnp.int32).at[0].set(counts_of(out))
  return Steered(out.samples, None, None, None, check, int(out.nfe))


def run_smc(pieces, key_noise, key_run, first, chunk, labels, *, reward, steps,
            options: SMCOptions) -> Steered:
  """Group g (rows g P .. g P + P - 1): SMC from its noise rows, with fold_in(key_run, g)."""
  from fmjax.steering import smc   # pylint: disable=import-outside-toplevel
  particles, nfe = options.num_particles, []

  def one_group(g, y):   # group g: rows g P .. g P + P - 1, its own resampling key
    out = smc.smc_sample(jax.random.fold_in(key_run, g),
                         pieces.noise(key_noise, particles, g * particles), flow_map=pieces.flow_map,
                         velocity=pieces.velocity, interpolant=pieces.interpolant, reward=reward,
                         num_steps=steps, labels=y, **dataclasses.asdict(options))
    nfe.append(int(out.nfe))
    moved = jnp.zeros((particles,), jnp.int32) if out.labels is None else out.labels
    return out.samples, out.log_weights, out.ess, moved, counts_of(out)

  x, log_w, ess, moved, check = per_unit(one_group, first // particles, chunk // particles,
                                         labels, particles)
  return Steered(x.reshape((chunk,) + x.shape[2:]), log_w.reshape(chunk), ess,
                 None if labels is None else moved.reshape(chunk), check, nfe[0])


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """A steering method: its options dataclass, its runner
  run(pieces, key_noise, key_run, first, chunk, labels, *, reward, steps, options) -> Steered
  (rows first .. first + chunk - 1, chunk a multiple of options.group), and old option names
  still accepted {old: new}."""

  options: type
  run: Callable[..., Steered]
  old_names: Mapping[str, str] = dataclasses.field(default_factory=dict)


METHODS: dict[str, MethodSpec] = {
    'best_of_n': MethodSpec(BestOfNOptions, run_best_of_n, {'n': 'num_particles'}),
    'guidance': MethodSpec(GuidanceOptions, run_guidance),
    'smc': MethodSpec(SMCOptions, run_smc),
}


def option_names(method: str) -> tuple:
  """The method's options beyond the temperature (Model.steer takes that one on its own)."""
  return tuple(f.name for f in dataclasses.fields(METHODS[method].options) if f.name != 'temperature')


def config_fields() -> dict:
  """{name: default} of every method's options that config.steer carries (one field per name;
  a name shared by several methods has one default, checked here)."""
  out = {}
  for spec in METHODS.values():
    for f in dataclasses.fields(spec.options):
      if f.metadata.get('config', True):
        if out.setdefault(f.name, f.default) != f.default:
          raise AssertionError(f'the steering option {f.name} has two defaults; give it one')
  return out


def options_from_config(steer) -> SteeringOptions:
  """config.steer's options for its method (ValueError 'NAME = VALUE ...' on a bad value)."""
  cls = METHODS[steer.method].options
  return cls(**{f.name: steer[f.name] for f in dataclasses.fields(cls)
                if f.metadata.get('config', True)})
