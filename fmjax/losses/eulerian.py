"""Eulerian rules: the map is constant along the flow, d/ds X_{s,t}(x) + grad X_{s,t}(x) b_s(x) = 0.

All of them evaluate the total derivative along (ds, dx) = (1, w) with one `jax.jvp` of
(s, x) -> X_{s,t}(x) (or -> v_{s,t}(x)), for some tangent velocity w:

- ESD (Eulerian self-distillation, Boffi et al. 2505.18825, Sec. 3), w = sg[v_{s,s}(I_s)]:
    E | d/ds X_{s,t}(I_s) + sg[grad X_{s,t}(I_s) w] |^2
- EMD (Eulerian map distillation, Boffi et al. 2406.07507, Sec. 3), w = b_s(I_s) a teacher:
    E | d/ds X_{s,t}(I_s) + grad X_{s,t}(I_s) b_s(I_s) |^2
- MeanFlow (Geng et al. 2505.13447, Eqs. 6-10), w = dI_s/ds the conditional velocity, in
  fmjax time (s = 1 - t_MF, t = 1 - r_MF, v = -u; see flow_maps.MeanFlowMap):
    E | v_{s,t}(I_s) - sg[w + (t - s) (d/ds + w . grad) v_{s,t}(I_s)] |^2
  MeanFlow's identity u = v - (t - r) du/dt is exactly the Eulerian residual in v-space:
  v - w - (t - s) Dv = -(d/ds + w . grad) X_{s,t}. Classifier-free guidance is folded into w
  (MeanFlow Eq. 13 and its kappa variant, Appendix B.1).
- improved MeanFlow (iMF, Geng, Lu et al. 2025, "Improved Mean Flows", arXiv 2512.02012), w =
  the model's own velocity sg[v_{s,s}(I_s)]; the compound velocity V = v - (t - s) sg[Dv]
  regresses onto dI/ds (or a fixed-guidance velocity). iMF with the guidance scale as a
  network input and its auxiliary velocity head: fmjax/losses/imf.py.

`eulerian_gradient` picks which part of the residual carries the gradient:
  'derivative' only d/ds X (ESD; two jvps: the stopped grad X w is a forward-only jvp),
  'residual'   the whole residual (EMD; one jvp with backprop through its tangent),
  'primal'     only the primal v_{s,t} (MeanFlow; one jvp, no backprop through its tangent,
               about half the cost of the other two).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax.interpolants import expand
from fmjax.losses import base
from fmjax.losses import times as times_lib

sg = base.sg
GRADIENTS = ('derivative', 'residual', 'primal')


def total_derivative(fn, s, x, w):
  """(fn(s, x), (d/ds + w . grad_x) fn(s, x)) by one jvp with tangents (1, w)."""
  return jax.jvp(fn, (s, x), (jnp.ones_like(s), w))


def eulerian_error(fm, net, s, t, x, labels, w, gradient: str):
  """The Eulerian residual d/ds X + grad X w, with the gradient placement `gradient`.

  For 'primal' the error is in v-space, v - sg[w + (t - s) Dv] = -(dX/ds + grad X w) exactly
  (the same value), since X = x + (t - s) v for every parameterization.
  """
  if gradient == 'derivative':
    dX_ds = jax.jvp(lambda ss: fm.X(net, ss, t, x, labels), (s,), (jnp.ones_like(s),))[1]
    transport = jax.jvp(lambda xx: fm.X(sg(net), s, t, xx, labels), (x,), (w,))[1]
    return dX_ds + sg(transport)
  if gradient == 'residual':
    return total_derivative(lambda ss, xx: fm.X(net, ss, t, xx, labels), s, x, w)[1]
  if gradient == 'primal':
    v, dv = total_derivative(lambda ss, xx: fm.v(net, ss, t, xx, labels), s, x, w)
    return base.regress(v, v - w - expand(t - s, v) * dv)
  raise ValueError(f'Unknown eulerian_gradient {gradient!r}; choose one of {GRADIENTS}.')


def eulerian_rule(ctx: base.Context, eulerian_gradient: str = 'derivative'):
  """ESD without a teacher, EMD with one (tangent w = the model's or the teacher's b_s(I_s))."""
  if eulerian_gradient not in GRADIENTS:
    raise ValueError(f'Unknown eulerian_gradient {eulerian_gradient!r}; choose one of {GRADIENTS}.')
  fm = ctx.flow_map

  def off_diagonal(params, rows, key, step):
    del step
    s, t = times_lib.sample_pairs(key, rows.x1.shape[0], ctx.options.times)
    x_s = ctx.interpolant.sample(s, rows.x0, rows.x1)
    if ctx.teacher is not None:
      w = sg(ctx.teacher(s, x_s, rows.labels))
    else:
      w = sg(fm.velocity(params['net'], s, x_s, rows.labels))
    error = eulerian_error(fm, params['net'], s, t, x_s, rows.labels, w, eulerian_gradient)
    return base.mean_square(error), s, t, {}

  return base.two_part_rule(ctx, off_diagonal)


# --------------------------------------------------------------- classifier-free guidance


def guided_velocity(conditional_velocity, model_conditional, model_unconditional, labels,
                    null_label, omega: float, kappa: float):
  """MeanFlow's guided target velocity (Geng et al. 2025, Eq. 13 and Appendix B.1):
     v~ = omega dI/dt + kappa v(x | c) + (1 - omega - kappa) v(x | null),
  on rows with a real label; rows whose label is null keep dI/dt (they train the
  unconditional model). omega = 1, kappa = 0 is no guidance."""
  guided = omega * conditional_velocity + (1.0 - omega - kappa) * model_unconditional
  if kappa != 0.0:   # with kappa = 0 the conditional branch is not needed (may be None)
    guided = guided + kappa * model_conditional
  is_null = expand(labels == null_label, conditional_velocity)
  return jnp.where(is_null, conditional_velocity, guided)


def _uses_guidance(omega, kappa):
  return omega != 1.0 or kappa != 0.0


def _model_velocities(fm, net, t, x, labels, null_label):
  """v_{t,t}(x | c) and v_{t,t}(x | null) in one batched, stopped forward pass."""
  both = fm.velocity(net, jnp.concatenate([t, t]), jnp.concatenate([x, x]),
                     jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
  conditional, unconditional = jnp.split(sg(both), 2)
  return conditional, unconditional


DIAGONAL_TIMES = ('pair', 'diagonal_times')


def meanflow_rule(ctx: base.Context, omega: float = 1.0, kappa: float = 0.0,
                  improved: bool = False, diagonal_time: str = 'pair'):
  """MeanFlow (improved=False) and iMF (improved=True), with optional in-target guidance.

  diagonal_time: 'pair' (default) draws the r = t rows' time as MeanFlow does: the reference
  code (Gsunshine/meanflow, meanflow.py `sample_tr`) draws t and r from `times`, sorts them
  (t = max, r = min in its time, 1 = noise) and sets r = t on the first `data_proportion`
  (0.75) of the rows, so the diagonal's time is the max of two draws in MeanFlow time, the min
  of two draws (the pair's s) in fmjax time. 'diagonal_times' draws it from `diagonal_times`.
  """
  fm, options = ctx.flow_map, ctx.options
  if diagonal_time not in DIAGONAL_TIMES:
    raise ValueError(f'Unknown diagonal_time {diagonal_time!r}; choose one of {DIAGONAL_TIMES}.')
  guidance = _uses_guidance(omega, kappa)
  if guidance and options.null_label is None:
    raise ValueError('Guidance (omega != 1 or kappa != 0) needs null_label, the class id of "no label".')

  def target_velocity(s, x_s, rows, model_conditional=None, model_unconditional=None):
    w = base.tangent_velocity(ctx, s, x_s, rows)
    if guidance and rows.labels is not None:
      w = guided_velocity(w, model_conditional, model_unconditional, rows.labels,
                          options.null_label, omega, kappa)
    return w

  def off_diagonal(params, rows, key, step):
    del step
    net = params['net']
    s, t = times_lib.sample_pairs(key, rows.x1.shape[0], options.times)
    x_s = ctx.interpolant.sample(s, rows.x0, rows.x1)
    v_c = v_u = None
    if guidance and rows.labels is not None and (kappa != 0.0 or improved):
      v_c, v_u = _model_velocities(fm, net, s, x_s, rows.labels, options.null_label)
    elif guidance and rows.labels is not None:
      # kappa = 0: the guided target needs only the unconditional branch (the reference's
      # `guidance_fn` also skips the conditional pass then).
      null = jnp.full_like(rows.labels, options.null_label)
      v_u = sg(fm.velocity(net, s, x_s, null))
    elif improved:
      v_c = sg(fm.velocity(net, s, x_s, rows.labels))
    target = target_velocity(s, x_s, rows, v_c, v_u)
    # MeanFlow moves x along its target velocity; iMF along the model's own velocity.
    w = v_c if improved else target
    v, dv = total_derivative(lambda ss, xx: fm.v(net, ss, t, xx, rows.labels), s, x_s, w)
    if improved:
      error = base.regress(v, v - expand(t - s, v) * dv - target)
    else:
      error = base.regress(v, v - target - expand(t - s, v) * dv)
    return base.mean_square(error), s, t, {}

  def diagonal_target(params, t, x_t, rows, prediction):
    if not (guidance and rows.labels is not None):
      return base.tangent_velocity(ctx, t, x_t, rows)
    # The conditional branch at r = t is the prediction itself; only the null pass is new.
    v_u = sg(fm.velocity(params['net'], t, x_t, jnp.full_like(rows.labels, options.null_label)))
    return target_velocity(t, x_t, rows, sg(prediction), v_u)

  def pair_start(key, n):
    # The earlier time s of a pair drawn as the off-diagonal pairs are (see the docstring).
    return times_lib.sample_pairs(key, n, options.times)[0]

  times_fn = pair_start if diagonal_time == 'pair' else None
  return base.two_part_rule(ctx, off_diagonal, diagonal_target, diagonal_times_fn=times_fn)
