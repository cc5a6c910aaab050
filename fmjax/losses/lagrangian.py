"""Lagrangian rules: the map moves along the flow, d/dt X_{s,t}(x) = b_t(X_{s,t}(x)).

LSD (Lagrangian self-distillation, Boffi, Albergo & Vanden-Eijnden, arXiv 2505.18825, Sec. 3):
  E | d/dt X_{s,t}(I_s) - sg[v_{t,t}(X_{s,t}(I_s))] |^2
LMD (Lagrangian map distillation, Boffi et al., arXiv 2406.07507, Sec. 3): the same with a
teacher velocity b_t in the target.
d/dt X is `jax.jvp` of t -> X_{s,t}(x) with tangent 1, and its primal output X_{s,t}(I_s) is
the point where the target velocity is evaluated (no second forward pass of the map).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax.interpolants import expand
from fmjax.losses import base
from fmjax.losses import times as times_lib

sg = base.sg


def lagrangian_rule(ctx: base.Context, grad_through_jvp: bool = True):
  """LSD without a teacher, LMD with one.

  grad_through_jvp=True backpropagates through the tangent d/dt X (the papers' gradient,
  about 2x the cost of flow matching per row); False keeps the same residual but lets the
  gradient flow only through the primal v_{s,t}, MeanFlow style:
  v - sg[b_t(X) - (t - s) d/dt v].
  """
  fm = ctx.flow_map

  def target_velocity(params, t, x, labels):
    if ctx.teacher is not None:
      return sg(ctx.teacher(t, x, labels))
    return sg(fm.velocity(params['net'], t, x, labels))

  def off_diagonal(params, rows, key, step):
    del step
    n = rows.x1.shape[0]
    s, t = times_lib.sample_pairs(key, n, ctx.options.times)
    x_s = ctx.interpolant.sample(s, rows.x0, rows.x1)
    net, ones = params['net'], jnp.ones_like(t)
    if grad_through_jvp:
      X, dX_dt = jax.jvp(lambda tt: fm.X(net, s, tt, x_s, rows.labels), (t,), (ones,))
      error = dX_dt - target_velocity(params, t, sg(X), rows.labels)
    else:
      v, dv_dt = jax.jvp(lambda tt: fm.v(net, s, tt, x_s, rows.labels), (t,), (ones,))
      X = x_s + expand(t - s, x_s) * v
      residual = v + expand(t - s, v) * dv_dt - target_velocity(params, t, sg(X), rows.labels)
      error = base.regress(v, residual)
    return base.mean_square(error), s, t, {}

  return base.two_part_rule(ctx, off_diagonal)
