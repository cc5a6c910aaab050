"""Consistency models: flow maps to the data end only, f(x, s) = X_{s,1}(x).

- sCT / sCD (continuous-time consistency training / distillation, Lu & Song, arXiv
  2410.11081; equation numbers not checked): the Eulerian rule with t = 1 and the
  MeanFlow-style gradient through the primal only; the tangent w is dI_s/ds (training) or a
  teacher b_s (distillation). f(x, s) = X_{s,1}(x) = x + (1 - s) v_{s,1}(x), so
  -df/ds = g = v - w - (1 - s) Dv, Dv the total derivative along (1, w). Stabilizers (options):
  tangent normalization g / (|g| + c) (c = 0.1), and tangent warmup, which scales the
  (1 - s) Dv term by min(1, step / warmup_steps).
  How the warmup differs from the paper's: in TrigFlow, f = cos(t) x_t - sin(t) sigma_d F and
  df/dt = -cos(t)(sigma_d F - dx_t/dt) - sin(t)(x_t + sigma_d dF/dt); the warmup multiplies the
  second term, sin(t)(x_t + sigma_d dF/dt), by r (paper text not checked here; a third-party
  TrigFlow sCM loss in the stored code search does exactly this). Writing f = c_skip x +
  c_out F, that term is c_skip' x + c_out dF/dt. fmjax applies the same split to the
  displacement form f = x + (1 - s) v (c_skip = 1, c_out = 1 - s, so c_skip' x = 0): the two
  warmups agree when the network is read as the displacement v, and differ (by which part of
  df/ds is ramped) when it is read through TrigFlow's c_skip / c_out; both reach the full
  tangent at step >= warmup_steps. fmjax's time is s = 1 - 2 t / pi on the trigonometric
  interpolant.
- ECT (discrete consistency training, Geng et al., "Consistency models made easy", arXiv
  2406.14548; equation numbers not checked): the finite-difference version,
    E w d(X_{s,1}(I_s), sg[X_{s',1}(I_{s'})]),  s' > s,
  with the same noise for both times and d the pseudo-Huber distance (Song & Dhariwal 2023).
  gap_schedule='ect' (default) is the reference implementation's mapping (locuslab/ect,
  training/loss.py, `ECMLoss.t_to_r_sigmoid` and the `loss / (t - r)` weight), written in EDM
  noise level sigma and translated to fmjax time through sigma(s) = alpha(s) / beta(s)
  (I_s / beta(s) = x1 + sigma(s) x0, ECT's y + t eps; s = 1 is the data):
    r = max(0, sigma (1 - q^-(k + 1) (1 + 8 sigmoid(-sigma)))),  k = floor(step / d),
    s' = sigma^-1(r) (by bisection: any monotone interpolant),  w = 1 / (sigma - r),
  q = gap_decay, d = gap_halving_steps (ECT's `--double`, counted in ticks there, in steps
  here). While r = 0 the target is the data (s' = 1). gap_schedule='linear_time' is fmjax's
  earlier simplification: s' = s + gap, gap = (1 - s) q^-floor(step / d), at least
  min(min_gap, 1 - s), w = 1 / gap in fmjax time (min_gap is used by it only).
  Differences kept on purpose: s is drawn from the rule's `times` (ECT: log-normal sigma,
  P_mean -1.1, P_std 2.0), and d is fmjax's per-dimension pseudo-Huber with huber_c (ECT's
  default is sqrt(|.|^2 + c^2) - c on the summed error with c = 0).
  With a teacher (consistency distillation), I_{s'} is replaced by one Euler step of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax.interpolants import expand
from fmjax.losses import base

sg = base.sg


def sct_rule(ctx: base.Context, tangent_normalization: float = 0.1, warmup_steps: int = 0):
  """sCT (teacher None) / sCD (teacher given): E |g|^2 with g as in the module docstring, the
  gradient through v only; tangent_normalization <= 0 disables it, warmup_steps = 0 the warmup."""
  fm = ctx.flow_map

  def off_diagonal(params, rows, key, step):
    n = rows.x1.shape[0]
    s = ctx.options.times.sample(key, n)
    t = jnp.ones_like(s)
    x_s = ctx.interpolant.sample(s, rows.x0, rows.x1)
    w = base.tangent_velocity(ctx, s, x_s, rows)
    v, dv = jax.jvp(lambda ss, xx: fm.v(params['net'], ss, t, xx, rows.labels),
                    (s, x_s), (jnp.ones_like(s), w))
    ramp = jnp.minimum(1.0, step / warmup_steps) if warmup_steps else 1.0
    residual = v - w - ramp * expand(t - s, v) * dv
    if tangent_normalization > 0:
      residual = base.normalize_rows(residual, tangent_normalization)
    return base.mean_square(base.regress(v, residual)), s, t, {}

  return base.two_part_rule(ctx, off_diagonal)


GAP_SCHEDULES = ('ect', 'linear_time')
# ECT's sigmoid mapping constants (locuslab/ect, ct_train.py defaults -k 8 -b 1).
ECT_K, ECT_B = 8.0, 1.0


def edm_sigma(interpolant, s):
  """EDM noise level of fmjax time s: alpha(s) / beta(s) (infinite at s = 0, 0 at s = 1)."""
  return interpolant.alpha(s) / jnp.maximum(interpolant.beta(s), jnp.finfo(s.dtype).tiny)


def time_of_sigma(interpolant, sigma, lower, iterations: int = 64):
  """The s in [lower, 1] with edm_sigma(s) = sigma, by bisection (sigma(s) decreases in s)."""
  def halve(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    above = edm_sigma(interpolant, mid) > sigma      # mid is still too noisy: move up
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)
  lo, hi = jax.lax.fori_loop(0, iterations, halve, (lower, jnp.ones_like(lower)))
  return jnp.where(sigma <= 0, 1.0, hi)


def ect_rule(ctx: base.Context, gap_schedule: str = 'ect', gap_decay: float = 2.0,
             gap_halving_steps: int = 25_000, min_gap: float = 1e-3,
             huber_c: float | None = None):
  """ECT (teacher None) / discrete consistency distillation (teacher given); see the module
  docstring for the two gap schedules.

  huber_c defaults to iCT's 0.00054 sqrt(D) on the per-element scale, i.e. 0.00054 here
  since fmjax's norms are per-dimension RMS.
  """
  if gap_schedule not in GAP_SCHEDULES:
    raise ValueError(f'Unknown gap_schedule {gap_schedule!r}; choose one of {GAP_SCHEDULES}.')
  fm = ctx.flow_map
  c = 0.00054 if huber_c is None else huber_c

  def off_diagonal(params, rows, key, step):
    n = rows.x1.shape[0]
    s = ctx.options.times.sample(key, n)
    one = jnp.ones_like(s)
    stage = jnp.floor(step / gap_halving_steps)
    if gap_schedule == 'ect':
      sigma = edm_sigma(ctx.interpolant, s)
      decay = gap_decay ** -(stage + 1)
      r = jnp.maximum(0.0, sigma * (1.0 - decay * (1.0 + ECT_K * jax.nn.sigmoid(-ECT_B * sigma))))
      s_next = sg(time_of_sigma(ctx.interpolant, r, s))
      # ECT's weight 1 / (t - r) in sigma; at s = 1 (sigma = r = 0) the error is 0 too.
      weight = 1.0 / jnp.maximum(sigma - r, jnp.finfo(s.dtype).tiny)
    else:
      gap = jnp.maximum((1.0 - s) * gap_decay ** -stage, jnp.minimum(min_gap, 1.0 - s))
      s_next = s + gap
      weight = 1.0 / gap
    gap = s_next - s
    x_s = ctx.interpolant.sample(s, rows.x0, rows.x1)
    if ctx.teacher is None:
      x_next = ctx.interpolant.sample(s_next, rows.x0, rows.x1)
    else:
      x_next = x_s + expand(gap, x_s) * sg(ctx.teacher(s, x_s, rows.labels))
    target = sg(fm.X(params['net'], s_next, one, x_next, rows.labels))
    error = fm.X(params['net'], s, one, x_s, rows.labels) - target
    return base.pseudo_huber(error, c) * weight, s, one, {'gap': jnp.mean(gap)}

  return base.two_part_rule(ctx, off_diagonal)
