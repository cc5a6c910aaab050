"""Improved MeanFlow (iMF; Geng, Lu et al. 2025, "Improved Mean Flows", arXiv 2512.02012).

Written from the reference code (Lyy-iiis/imeanflow, imf.py `iMeanFlow.forward`,
`guidance_fn`, `sample_cfg_scale`, `sample_cfg_interval`; configs/default.py); the paper's
equation numbers are not checked. In fmjax time (s < t, 0 noise; MeanFlow's t = 1 - s,
r = 1 - t, u = -v; see flow_maps.MeanFlowMap), on the off-diagonal rows:

  guidance inputs   omega ~ p(omega) ∝ omega^-beta on [1, omega_max] (beta = 1: log-uniform),
                    interval start ~ U[0, 1/2], end ~ U[1/2, 1] (reference t_min, t_max),
                    w = omega if start <= s <= end else 1
  model velocities  v_c = sg[b_s(I_s | c, w)], v_u = sg[b_s(I_s | null, 1)], both on [0, 1]
  guided target     v~ = dI_s/ds + (1 - 1/w)(v_c - v_u)   (dI_s/ds on label-dropped rows)
  compound velocity V = v_{s,t}(I_s | c, omega, start, end) - (t - s) sg[(d/ds + v_c . grad) v_{s,t}]
  loss              |V - v~|^2 (gradient through the primal v_{s,t} only)

and on the diagonal rows (the reference's r = t rows, interval [0, 1]) |b_t(I_t | c, omega) - v~|^2
with v_c the prediction itself. Why this target is guidance (fmjax's derivation, not the
paper's text): the diagonal's minimizer satisfies v_c = E[v~ | x, c], i.e.
v_c = v_u + omega (E[dI/ds | x, c] - v_u), classifier-free guidance of scale omega.

With a velocity head (network option `velocity_head`, rule option `velocity_head_weight` > 0)
the model velocities v_c, v_u come from the head, and the head's output at the row's inputs
regresses onto the same target (reference: `loss_v`, weight 1, its own adaptive weight).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from fmjax import conditioning
from fmjax.interpolants import expand
from fmjax.losses import base
from fmjax.losses import eulerian
from fmjax.losses import times as times_lib

sg = base.sg


def draw_omega(key, n: int, omega_max: float, power: float) -> jax.Array:
  """n guidance scales with density ∝ omega^-power on [1, omega_max], by the inverse CDF.

  Reference `sample_cfg_scale` (s_max = 7, i.e. omega_max = 8; cfg_beta = power = 1: omega =
  omega_max^u, log-uniform).
  """
  u = jax.random.uniform(key, (n,))
  if power == 1.0:
    return jnp.exp(u * jnp.log(omega_max))
  a = 1.0 - power
  return jnp.exp(jnp.log1p(u * jnp.expm1(a * jnp.log(omega_max))) / a)


def draw_interval(key, n: int) -> tuple[jax.Array, jax.Array]:
  """(start ~ U[0, 1/2], end ~ U[1/2, 1]) in fmjax time: the reference's `sample_cfg_interval`
  (t_min ~ U[0, 1/2], t_max ~ U[1/2, 1] in MeanFlow time) mapped by t -> 1 - t."""
  key_start, key_end = jax.random.split(key)
  return 0.5 * jax.random.uniform(key_start, (n,)), 0.5 + 0.5 * jax.random.uniform(key_end, (n,))


def guided_target(conditional_velocity, v_c, v_u, omega, labels, null_label):
  """v~ = dI/ds + (1 - 1/omega)(v_c - v_u) on labelled rows, dI/ds on null rows (reference
  `guidance_fn`, `cond_drop`)."""
  guided = conditional_velocity + expand(1.0 - 1.0 / omega, v_c) * (v_c - v_u)
  return jnp.where(expand(labels == null_label, guided), conditional_velocity, guided)


def head_map(flow_map, head: str):
  """The same parameterization reading the network's output `head` ('velocity': the auxiliary head)."""
  return dataclasses.replace(flow_map, apply=functools.partial(flow_map.apply, head=head))


def both_heads(flow_map, method: str, params, *args):
  """`flow_map.<method>(params, *args)` of the average head and of the velocity head, from ONE
  network pass (head='both'), as iMF's reference network returns (u, v) together.

  Each head goes through the same parameterization: the first evaluation runs the network and
  keeps the velocity head's output; the second is the flow map with an `apply` that returns
  that output (every flow map calls `apply` once per evaluation, with the same arguments for
  both heads, so this equals two separate evaluations at the cost of one trunk)."""
  kept = []

  def apply_average(*a, **k):
    average, velocity = flow_map.apply(*a, head='both', **k)
    kept.append(velocity)
    return average

  average = getattr(dataclasses.replace(flow_map, apply=apply_average), method)(params, *args)
  if len(kept) != 1:
    raise RuntimeError(f'{type(flow_map).__name__}.{method} called the network {len(kept)} times; '
                       'both_heads needs exactly one call.')
  reuse = lambda *a, **k: kept[0]
  return average, getattr(dataclasses.replace(flow_map, apply=reuse), method)(params, *args)


def imf_rule(ctx: base.Context, omega: float = 1.0, kappa: float = 0.0, improved: bool = True,
             diagonal_time: str = 'pair', guidance_conditioning: bool = False,
             omega_max: float = 8.0, omega_power: float = 1.0, guidance_interval: bool = True,
             velocity_head_weight: float = 0.0):
  """iMF. guidance_conditioning=False: the unguided (or fixed-guidance omega, kappa) iMF of
  `eulerian.meanflow_rule(improved=True)`, unchanged. True: the guidance scale and interval
  are drawn per row and fed to the network (see the module docstring); needs labels, a
  `null_label` and a network built with guidance_conditioning=True.

  omega_max, omega_power: the guidance-scale distribution (reference s_max + 1 = 8, cfg_beta = 1);
  guidance_interval: draw the interval (reference) or always use [0, 1];
  velocity_head_weight: weight of the auxiliary velocity head's loss (reference 1.0; 0 = no
  head; > 0 needs a network built with velocity_head=True).
  """
  if not improved:
    raise ValueError("imf always uses the model's own velocity (improved=True); use loss 'meanflow'.")
  if velocity_head_weight < 0:
    raise ValueError(f'velocity_head_weight must be >= 0, got {velocity_head_weight}.')
  if not guidance_conditioning:
    if velocity_head_weight:
      raise ValueError('velocity_head_weight > 0 is implemented with guidance_conditioning=True only.')
    return eulerian.meanflow_rule(ctx, omega, kappa, improved=True, diagonal_time=diagonal_time)
  options = ctx.options
  if (omega, kappa) != (1.0, 0.0):
    raise ValueError('guidance_conditioning=True draws the guidance scale per row: leave the fixed '
                     f'omega = 1, kappa = 0 (got omega={omega}, kappa={kappa}).')
  if not omega_max >= 1.0:
    raise ValueError(f'omega_max must be >= 1 (guidance scales lie in [1, omega_max]), got {omega_max}.')
  if options.null_label is None:
    raise ValueError('guidance_conditioning=True needs null_label, the class id of "no label".')
  if ctx.teacher is not None:
    raise ValueError('guidance_conditioning=True trains from scratch (the guided target uses the '
                     "model's own velocities); drop the teacher.")
  if diagonal_time not in eulerian.DIAGONAL_TIMES:
    raise ValueError(f'Unknown diagonal_time {diagonal_time!r}; choose one of {eulerian.DIAGONAL_TIMES}.')
  fm, interp = ctx.flow_map, ctx.interpolant
  with_head = velocity_head_weight > 0
  velocity_map = head_map(fm, 'velocity') if with_head and fm is not None else fm

  def weigh(per_row, params, s, t, x):
    return base.weigh(per_row, params, s, t, options, base.num_dims(x))

  def with_head_term(raw, head_error, params, s, t, x):
    """(weighted per-row loss, raw, extra metrics), plus the head's own weighted term if any."""
    per_row = weigh(raw, params, s, t, x)
    if head_error is None:
      return per_row, raw, {}
    head_raw = base.mean_square(head_error)
    return per_row + velocity_head_weight * weigh(head_raw, params, s, t, x), raw, {'head': head_raw}

  def model_velocities(net, s, x, labels, w):
    """sg[b_s(x | c, w)], sg[b_s(x | null, 1)] in one batched pass, on the interval [0, 1]."""
    n = x.shape[0]
    cond = conditioning.concatenate([conditioning.make(labels, w, n),
                                     conditioning.make(jnp.full_like(labels, options.null_label), 1.0, n)])
    both = velocity_map.velocity(net, jnp.concatenate([s, s]), jnp.concatenate([x, x]), cond)
    return jnp.split(sg(both), 2)

  def off_diagonal(params, rows, key):
    net, n = params['net'], rows.x1.shape[0]
    key_t, key_w, key_i = jax.random.split(key, 3)
    s, t = times_lib.sample_pairs(key_t, n, options.times)
    x_s = interp.sample(s, rows.x0, rows.x1)
    w = draw_omega(key_w, n, omega_max, omega_power)
    if guidance_interval:
      start, end = draw_interval(key_i, n)
    else:
      start, end = jnp.zeros_like(s), jnp.ones_like(s)
    w_active = jnp.where((s >= start) & (s <= end), w, 1.0)
    v_c, v_u = model_velocities(net, s, x_s, rows.labels, w_active)
    target = guided_target(interp.time_derivative(s, rows.x0, rows.x1), v_c, v_u, w_active,
                           rows.labels, options.null_label)
    cond = conditioning.Guidance(rows.labels, w, start, end)
    # The tangent is the model's own (guided) velocity v_c, not dI/ds (iMF's change to MeanFlow).
    # With the head, its output at the row's inputs comes from the jvp's primal pass (its
    # tangent is unused and compiled away): one trunk for both, as in the reference.
    if with_head:
      (v, v_head), (dv, _) = eulerian.total_derivative(
          lambda ss, xx: both_heads(fm, 'v', net, ss, t, xx, cond), s, x_s, v_c)
    else:
      v, dv = eulerian.total_derivative(lambda ss, xx: fm.v(net, ss, t, xx, cond), s, x_s, v_c)
    raw = base.mean_square(base.regress(v, v - expand(t - s, v) * dv - target))
    return with_head_term(raw, v_head - target if with_head else None, params, s, t, x_s)

  def pair_start(key, n):
    return times_lib.sample_pairs(key, n, options.times)[0]

  def diagonal(params, rows, key):
    net, n = params['net'], rows.x1.shape[0]
    key_t, key_w = jax.random.split(key)
    t = pair_start(key_t, n) if diagonal_time == 'pair' else options.diagonal_times.sample(key_t, n)
    x_t = interp.sample(t, rows.x0, rows.x1)
    w = draw_omega(key_w, n, omega_max, omega_power)
    cond = conditioning.make(rows.labels, w, n)        # the diagonal's interval is [0, 1]
    if with_head:   # the prediction and the head at the same inputs: one trunk
      prediction, head = both_heads(fm, 'velocity', net, t, x_t, cond)
    else:
      prediction = head = fm.velocity(net, t, x_t, cond)
    null = conditioning.make(jnp.full_like(rows.labels, options.null_label), 1.0, n)
    v_u = sg(velocity_map.velocity(net, t, x_t, null))
    target = guided_target(interp.time_derivative(t, rows.x0, rows.x1), sg(head), v_u, w,
                           rows.labels, options.null_label)
    raw = base.mean_square(prediction - target)
    return with_head_term(raw, head - target if with_head else None, params, t, t, x_t)

  def loss_fn(params, batch, key):
    rows, key = base.draw_rows(batch, key, options)
    if rows.labels is None:
      raise ValueError('guidance_conditioning=True needs class labels in the batch.')
    batch_size = rows.x1.shape[0]
    n_diag = base.num_diagonal(batch_size, options.diagonal_fraction)
    off_rows, diag_rows = base.split_rows(rows, batch_size - n_diag)
    key_off, key_diag = jax.random.split(key)    # as base.two_part_rule
    off_loss = off_raw = diag_loss = diag_raw = None
    heads = []
    if batch_size - n_diag:
      off_loss, off_raw, extra = off_diagonal(params, off_rows, key_off)
      heads += list(extra.values())
    if n_diag:
      diag_loss, diag_raw, extra = diagonal(params, diag_rows, key_diag)
      heads += list(extra.values())
    metrics = {'loss_velocity_head': jnp.mean(jnp.concatenate(heads))} if heads else {}
    return base.combine(off_loss, off_raw, diag_loss, diag_raw, metrics)

  return loss_fn
