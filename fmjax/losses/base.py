"""What every training rule shares: the batch draw, the diagonal term, weighting and reduction.

A rule is a pure function `(params, batch, key) -> (loss, metrics)`:
  params = {'net': network params, 'log_variance': ... (only with learned weighting)}
  batch  = {'x1': data [B, ...], 'labels': int [B] (optional), 'x0': noise (optional),
            'step': scalar (optional; annealed schedules such as ECT's and sCT's read it)}
The first B - n_diag rows of a batch are off-diagonal pairs s < t, the last n_diag rows are
diagonal pairs s = t trained by flow matching, with n_diag = round(diagonal_fraction * B)
fixed at trace time: jvps then run only on the rows that need them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fmjax.interpolants import Interpolant, expand
from fmjax.losses import times as times_lib

sg = jax.lax.stop_gradient
Teacher = Callable[..., jax.Array]   # teacher(t, x, labels) -> b_t(x)


class Rows(NamedTuple):
  """A slice of the batch: noise x0, data x1, labels (or None)."""
  x0: jax.Array
  x1: jax.Array
  labels: jax.Array | None


@dataclasses.dataclass(frozen=True)
class CommonOptions:
  """Options every rule understands (the config's `loss.*` keys).

  diagonal_fraction: share of each batch on s = t (flow matching on the map's diagonal).
  times: distribution of the off-diagonal pair times; diagonal_times: of the diagonal times.
  weighting: 'none', 'adaptive' (MeanFlow's 1 / (|err|^2 + c)^p under stop-gradient,
    Geng et al. 2025, Sec. 4.3, with |err|^2 the SUM of squares over dimensions as in the
    reference code, Gsunshine/meanflow meanflow.py: `jnp.sum(loss, axis=(1, 2, 3))`, so c means
    the same at every resolution; fmjax's per-row loss stays the per-dimension mean, so the
    weighted loss is the reference's divided by the dimension D) or 'learned' (a learned log-variance u(s, t) of the loss,
    EDM2, Karras et al. 2024, Eq. 14: loss / exp(u) + u).
  label_dropout: probability of replacing a label by the null label `null_label`
    (classifier-free guidance training, Ho & Salimans 2022).
  """

  diagonal_fraction: float = 0.75
  times: times_lib.TimeDistribution = times_lib.TimeDistribution()
  diagonal_times: times_lib.TimeDistribution = times_lib.TimeDistribution()
  weighting: str = 'none'
  adaptive_power: float = 1.0
  adaptive_eps: float = 1e-3
  label_dropout: float = 0.0
  null_label: int | None = None

  def __post_init__(self):
    if not 0.0 <= self.diagonal_fraction <= 1.0:
      raise ValueError(f'diagonal_fraction must be in [0, 1], got {self.diagonal_fraction}.')
    if self.weighting not in ('none', 'adaptive', 'learned'):
      raise ValueError(f"Unknown weighting {self.weighting!r}; choose 'none', 'adaptive' or 'learned'.")
    if self.label_dropout > 0 and self.null_label is None:
      raise ValueError('label_dropout > 0 needs null_label (the class id of "no label", usually num_classes).')


def num_diagonal(batch_size: int, fraction: float) -> int:
  return int(round(batch_size * fraction))


def draw_rows(batch: dict, key, options: CommonOptions) -> tuple[Rows, jax.Array]:
  """Noise, data and (possibly dropped) labels for the whole batch, and a fresh key."""
  x1 = batch['x1']
  key_noise, key_drop, key = jax.random.split(key, 3)
  x0 = batch['x0'] if 'x0' in batch else jax.random.normal(key_noise, x1.shape, x1.dtype)
  labels = batch.get('labels')
  if labels is not None and options.label_dropout > 0:
    drop = jax.random.bernoulli(key_drop, options.label_dropout, labels.shape)
    labels = jnp.where(drop, options.null_label, labels)
  return Rows(x0, x1, labels), key


def split_rows(rows: Rows, n_off: int) -> tuple[Rows, Rows]:
  cut = lambda a, sl: None if a is None else a[sl]
  head = Rows(*(cut(a, slice(None, n_off)) for a in rows))
  tail = Rows(*(cut(a, slice(n_off, None)) for a in rows))
  return head, tail


def mean_square(err: jax.Array) -> jax.Array:
  """Per-row mean of squares over all non-batch axes (norms are per-dimension means in fmjax).

  Low-precision errors (bfloat16, float16) are reduced in float32; float64 stays float64.
  """
  err = err.astype(jnp.promote_types(err.dtype, jnp.float32))
  return jnp.mean(jnp.square(err), axis=tuple(range(1, err.ndim)))


def pseudo_huber(err: jax.Array, c: float) -> jax.Array:
  """Per-row sqrt(|err|^2 + c^2) - c with |.| the per-dimension RMS (Song & Dhariwal 2023, iCT, Eq. 8).

  c = 0 is the RMS itself (ECT's default); the floor keeps its gradient finite at err = 0."""
  square = mean_square(err) + c**2
  return jnp.sqrt(jnp.maximum(square, jnp.finfo(square.dtype).tiny)) - c


def normalize_rows(err: jax.Array, c: float) -> jax.Array:
  """err / (|err| + c) per row with |.| the per-dimension RMS: sCT's tangent normalization (Lu & Song 2024, Sec. 4.2)."""
  norm = jnp.sqrt(mean_square(err))
  return err / expand(norm + c, err)


def regress(prediction: jax.Array, residual: jax.Array) -> jax.Array:
  """An error whose value is `residual` and whose gradient flows only through `prediction`.

  prediction - sg[prediction - residual]: the MeanFlow-style "regress the primal onto a
  stopped target" (Geng et al. 2025, Eq. 10), written so the target needs no second pass.
  """
  return prediction - sg(prediction - residual)


# ----------------------------------------------------------------------------- weighting


def init_log_variance(key, num_features: int = 64) -> dict:
  """Parameters of u(s, t) = w . cos(2 pi (f [s, t] + phase)) + b (EDM2's learned loss weight)."""
  key_f, key_p = jax.random.split(key)
  return {'frequencies': jax.random.normal(key_f, (2, num_features)),
          'phases': jax.random.uniform(key_p, (num_features,)),
          'w': jnp.zeros((num_features,)), 'b': jnp.zeros(())}


def log_variance(params: dict, s, t) -> jax.Array:
  # The random Fourier features are fixed at init (stopped), only w and b learn.
  st = jnp.stack([s, t], axis=-1)
  features = jnp.cos(2 * jnp.pi * (st @ sg(params['frequencies']) + sg(params['phases'])))
  return features @ params['w'] / jnp.sqrt(features.shape[-1]) + params['b']


def weigh(per_row: jax.Array, params: dict, s, t, options: CommonOptions,
          num_dims: int) -> jax.Array:
  """Applies the configured weighting to per-row losses (per-dimension means over `num_dims`
  dimensions). The adaptive weight reads the summed square num_dims * per_row (MeanFlow's
  |err|^2), so its constant c does not scale with the dimension."""
  if options.weighting == 'adaptive':
    summed = per_row * num_dims
    return sg(1.0 / (summed + options.adaptive_eps) ** options.adaptive_power) * per_row
  if options.weighting == 'learned':
    u = log_variance(params['log_variance'], s, t)
    return per_row * jnp.exp(-u) + u
  return per_row


# ------------------------------------------------------------------------------ the rule


@dataclasses.dataclass(frozen=True)
class Rule:
  """A named training rule: call it as rule(params, batch, key) -> (loss, metrics)."""

  name: str
  loss_fn: Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
  options: CommonOptions

  def init(self, net_params, key=None) -> dict:
    """The rule's parameter pytree around the network's: {'net': ..., 'log_variance': ...}."""
    params = {'net': net_params}
    if self.options.weighting == 'learned':
      params['log_variance'] = init_log_variance(jax.random.PRNGKey(0) if key is None else key)
    return params

  def __call__(self, params, batch, key):
    return self.loss_fn(params, batch, key)


# ------------------------------------------------------------------ the diagonal term


class Context(NamedTuple):
  """What a rule's loss function is built from."""
  flow_map: Any
  interpolant: Interpolant
  teacher: Teacher | None
  options: CommonOptions


def tangent_velocity(ctx: Context, t, x_t, rows: Rows) -> jax.Array:
  """The velocity a rule regresses onto: the conditional dI_t/dt, or the teacher's b_t(x_t)
  when distilling (velocity distillation of the diagonal)."""
  if ctx.teacher is not None:
    return sg(ctx.teacher(t, x_t, rows.labels))
  return ctx.interpolant.time_derivative(t, rows.x0, rows.x1)


def num_dims(x: jax.Array) -> int:
  """The number of non-batch entries of a row."""
  return math.prod(x.shape[1:])


def diagonal_term(ctx: Context, params, rows: Rows, key, target_fn=None, times_fn=None,
                  step: float = 0.0):
  """Flow matching on the map's diagonal: |v_{t,t}(I_t) - dI_t/dt|^2 (Lipman et al. 2023, Eq. 23;
  Boffi et al. 2505.18825, Sec. 3). Returns (per-row loss after weighting, raw per-row MSE, t).

  target_fn(params, t, x_t, rows, prediction) -> target lets a rule change the target (MeanFlow's
  guided velocity reuses the prediction itself as its conditional branch).
  times_fn(key, n) -> t replaces the draw from `diagonal_times` (MeanFlow draws these times as
  the earlier time of a pair). step > 0 trains v_{t,t+step} instead of v_{t,t} (shortcut
  models' flow-matching rows at the finest step, Frans et al. 2410.12557); times_fn must then
  keep t + step <= 1.
  """
  n = rows.x1.shape[0]
  t = ctx.options.diagonal_times.sample(key, n) if times_fn is None else times_fn(key, n)
  x_t = ctx.interpolant.sample(t, rows.x0, rows.x1)
  if step:
    prediction = ctx.flow_map.v(params['net'], t, t + step, x_t, rows.labels)
  else:
    prediction = ctx.flow_map.velocity(params['net'], t, x_t, rows.labels)
  if target_fn is None:
    target = tangent_velocity(ctx, t, x_t, rows)
  else:
    target = target_fn(params, t, x_t, rows, prediction)
  raw = mean_square(prediction - target)
  return weigh(raw, params, t, t + step, ctx.options, num_dims(rows.x1)), raw, t


def combine(off_loss, off_raw, diag_loss, diag_raw, extra_metrics=None):
  """Mean over all rows (each row counts once), plus per-part metrics."""
  parts = [p for p in (off_loss, diag_loss) if p is not None and p.shape[0]]
  loss = jnp.mean(jnp.concatenate(parts)) if parts else jnp.zeros(())
  metrics = {'loss': loss}
  if off_raw is not None and off_raw.shape[0]:
    metrics['loss_offdiagonal'] = jnp.mean(off_raw)
  if diag_raw is not None and diag_raw.shape[0]:
    metrics['loss_diagonal'] = jnp.mean(diag_raw)
  metrics.update(extra_metrics or {})
  return loss, metrics


def two_part_rule(ctx: Context, off_diagonal_fn: Callable, diagonal_target_fn=None,
                  diagonal_times_fn=None, diagonal_step: float = 0.0) -> Callable:
  """Builds loss_fn(params, batch, key) from a per-rule off-diagonal term.

  off_diagonal_fn(params, rows, key, step) -> (per_row, s, t, extra_metrics): `per_row` is
  the rule's distance per row (usually `mean_square(error)` of an error whose value is the
  rule's residual and which carries the gradient the rule prescribes); it is weighted here.
  diagonal_target_fn, diagonal_times_fn and diagonal_step go to `diagonal_term`.
  """
  options = ctx.options

  def loss_fn(params, batch, key):
    rows, key = draw_rows(batch, key, options)
    batch_size = rows.x1.shape[0]
    n_diag = num_diagonal(batch_size, options.diagonal_fraction)
    off_rows, diag_rows = split_rows(rows, batch_size - n_diag)
    key_off, key_diag = jax.random.split(key)
    off_loss = off_raw = diag_loss = diag_raw = None
    extra = {}
    if batch_size - n_diag:
      if off_diagonal_fn is None:
        raise ValueError('This rule has only a diagonal term: set diagonal_fraction = 1.')
      step = batch.get('step', jnp.zeros((), jnp.int32))
      off_raw, s, t, extra = off_diagonal_fn(params, off_rows, key_off, step)
      off_loss = weigh(off_raw, params, s, t, options, num_dims(rows.x1))
    if n_diag:
      diag_loss, diag_raw, _ = diagonal_term(ctx, params, diag_rows, key_diag, diagonal_target_fn,
                                             diagonal_times_fn, diagonal_step)
    return combine(off_loss, off_raw, diag_loss, diag_raw, extra)

  return loss_fn
