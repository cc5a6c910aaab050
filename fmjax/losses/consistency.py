"""Consistency models: flow maps to the data end only, f(x, s) = X_{s,1}(x).

- sCT / sCD (continuous-time consistency training / distillation, Lu & Song, arXiv
  2410.11081, Eqs. 8-9): the Eulerian rule with t = 1 and the MeanFlow-style gradient through
  the primal only; the tangent w is dI_s/ds (training) or a teacher b_s (distillation). Their
  stabilizers are options: tangent normalization g / (|g| + c) (Sec. 4.2) and tangent warmup,
  which scales the (1 - s) Dv term by min(1, step / warmup_steps) (Sec. 4.1).
- ECT (discrete consistency training, Geng et al., "Consistency models made easy", arXiv
  2406.14548, Eq. 6): the finite-difference version,
    E w(s, s') d(X_{s,1}(I_s), sg[X_{s',1}(I_{s'})]),  s' = s + gap,
  with the same noise for both times, d the pseudo-Huber distance (Song & Dhariwal 2023) and
  w = 1 / gap. The gap starts at s' = 1 (the target is the data: denoising pretraining) and
  shrinks by `gap_decay` every `gap_halving_steps` steps (ECT's q and d). With a teacher
  (consistency distillation), I_{s'} is replaced by one Euler step of the teacher.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax.interpolants import expand
from fmjax.losses import base

sg = base.sg


def sct_rule(ctx: base.Context, tangent_normalization: float = 0.1, warmup_steps: int = 0):
  """sCT (teacher None) / sCD (teacher given); tangent_normalization <= 0 disables it."""
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


def ect_rule(ctx: base.Context, gap_decay: float = 2.0, gap_halving_steps: int = 25_000,
             min_gap: float = 1e-3, huber_c: float | None = None):
  """ECT (teacher None) / discrete consistency distillation (teacher given).

  huber_c defaults to iCT's 0.00054 sqrt(D) on the per-element scale, i.e. 0.00054 here
  since fmjax's norms are per-dimension RMS.
  """
  fm = ctx.flow_map
  c = 0.00054 if huber_c is None else huber_c

  def off_diagonal(params, rows, key, step):
    n = rows.x1.shape[0]
    s = ctx.options.times.sample(key, n)
    one = jnp.ones_like(s)
    shrink = gap_decay ** -jnp.floor(step / gap_halving_steps)
    gap = jnp.maximum((1.0 - s) * shrink, jnp.minimum(min_gap, 1.0 - s))
    s_next = s + gap
    x_s = ctx.interpolant.sample(s, rows.x0, rows.x1)
    if ctx.teacher is None:
      x_next = ctx.interpolant.sample(s_next, rows.x0, rows.x1)
    else:
      x_next = x_s + expand(gap, x_s) * sg(ctx.teacher(s, x_s, rows.labels))
    target = sg(fm.X(params['net'], s_next, one, x_next, rows.labels))
    error = fm.X(params['net'], s, one, x_s, rows.labels) - target
    return base.pseudo_huber(error, c) / gap, s, one, {'gap': jnp.mean(gap)}

  return base.two_part_rule(ctx, off_diagonal)
