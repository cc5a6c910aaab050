"""Semigroup rules: X_{u,t}(X_{s,u}(x)) = X_{s,t}(x) for s <= u <= t.

PSD (progressive self-distillation, Boffi et al. 2505.18825, Sec. 3):
  E | X_{s,t}(I_s) - sg[X_{u,t}(X_{s,u}(I_s))] |^2,  u uniform in [s, t] or the midpoint.
Shortcut models (Frans, Hafner, Levine & Abbeel, arXiv 2410.12557, Eq. 5) are PSD at the
midpoint on dyadic jumps h = 2^-k, in v-space:
  E | v_{s,s+h}(x) - sg[(v_{s,s+h/2}(x) + v_{s+h/2,s+h}(X_{s,s+h/2}(x))) / 2] |^2,
with one row in eight a self-consistency row (their `bootstrap_every = 8`) and seven in eight
flow-matching rows. In the reference code (kvfrans/shortcut-models, targets_shortcut.py) the
flow-matching rows regress s(x_t, t, d) onto x1 - x0 at the finest step d = 1/128
(`dt_base = log2(denoise_timesteps)`, denoise_timesteps = 128) and at grid times t = j/128,
which trains v_{t,t+1/128}, the smallest step the h = 1/64 targets use; fmjax does the same
by default (finest_step_flow_matching).
Progressive distillation (Salimans & Ho 2022, generalized to maps by Boffi et al.
2406.07507, Sec. 3.3) is the same with the two inner jumps taken by a frozen teacher map
(progressive_rule: teacher_steps Heun steps of the teacher velocity per inner jump).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax import samplers
from fmjax.interpolants import expand
from fmjax.losses import base
from fmjax.losses import times as times_lib

sg = base.sg
INTERMEDIATES = ('uniform', 'midpoint')
SPACES = ('x', 'v')


def semigroup_rule(ctx: base.Context, intermediate: str = 'uniform', space: str = 'x',
                   dyadic_levels: int = 0, finest_step_flow_matching: bool = True,
                   teacher_map=None):
  """PSD / shortcut (teacher_map None) or progressive distillation (teacher_map given).

  space='x' compares maps (PSD); space='v' compares average velocities, the same residual
  divided by t - s (shortcut models). dyadic_levels > 0 draws shortcut's dyadic jumps.
  teacher_map(s, t, x, labels) -> a frozen map used for the two inner jumps.
  finest_step_flow_matching (only with dyadic_levels > 0): the flow-matching rows train
  v_{t,t+d} at the finest step d = 2^-dyadic_levels from grid times t = j d onto dI/dt, as the
  shortcut reference code does; False trains v_{t,t} at `diagonal_times` instead.
  """
  if intermediate not in INTERMEDIATES:
    raise ValueError(f'Unknown intermediate {intermediate!r}; choose one of {INTERMEDIATES}.')
  if space not in SPACES:
    raise ValueError(f'Unknown space {space!r}; choose one of {SPACES}.')
  if space == 'v' and teacher_map is not None:
    raise ValueError("Progressive distillation compares maps: use space='x' with a teacher map.")
  fm = ctx.flow_map

  def off_diagonal(params, rows, key, step):
    del step
    n = rows.x1.shape[0]
    key_pair, key_u = jax.random.split(key)
    if dyadic_levels:
      s, t = times_lib.sample_dyadic_steps(key_pair, n, dyadic_levels)
    else:
      s, t = times_lib.sample_pairs(key_pair, n, ctx.options.times)
    fraction = 0.5 if intermediate == 'midpoint' else jax.random.uniform(key_u, (n,))
    u = s + fraction * (t - s)
    x_s = ctx.interpolant.sample(s, rows.x0, rows.x1)
    net = params['net']
    if teacher_map is not None:
      inner = lambda a, b, x: sg(teacher_map(a, b, x, rows.labels))
    else:
      inner = lambda a, b, x: fm.X(sg(net), a, b, x, rows.labels)
    x_u = inner(s, u, x_s)
    if space == 'x':
      error = fm.X(net, s, t, x_s, rows.labels) - sg(inner(u, t, x_u))
    else:
      # v-space target (u - s)/(t - s) v_{s,u} + (t - u)/(t - s) v_{u,t}: no division needed.
      lam = expand(fraction * jnp.ones_like(s), x_s)
      target = (lam * fm.v(sg(net), s, u, x_s, rows.labels)
                + (1.0 - lam) * fm.v(sg(net), u, t, x_u, rows.labels))
      error = fm.v(net, s, t, x_s, rows.labels) - sg(target)
    return base.mean_square(error), s, t, {}

  if dyadic_levels and finest_step_flow_matching:
    cells = 2 ** dyadic_levels
    grid_times = lambda key, n: jax.random.randint(key, (n,), 0, cells) / cells
    return base.two_part_rule(ctx, off_diagonal, diagonal_times_fn=grid_times,
                              diagonal_step=1.0 / cells)
  return base.two_part_rule(ctx, off_diagonal)


# Heun steps of the teacher per half jump. Measured on the test Gaussian of tests/test_rules.py
# (linear interpolant, (s, t) = (0, 1), per-dimension RMS against a jump of 1.47): 1 step
# 0.28, 2 steps 0.053, 4 steps 0.011, 8 steps 0.0025 (order 2: each doubling divides it by
# ~4.5). One step (the old default) left a target 19% of the jump away from the true map.
TEACHER_STEPS = 8


def progressive_rule(ctx: base.Context, intermediate: str = 'midpoint',
                     teacher_steps: int = TEACHER_STEPS, teacher_map=None):
  """Progressive distillation (Salimans & Ho 2022, Algorithm 2, as a flow map by Boffi et al.
  2406.07507, Sec. 3.3; equation not checked):
    E | X_{s,t}(I_s) - sg[T_{u,t}(T_{s,u}(I_s))] |^2,  u the midpoint,
  T the frozen teacher map: teacher_steps Heun steps of the teacher velocity per inner jump
  (2 * teacher_steps NFE each), or teacher_map(s, t, x, labels) when a caller passes one.
  """
  if teacher_steps < 1:
    raise ValueError(f'teacher_steps must be >= 1, got {teacher_steps}.')
  if teacher_map is None and ctx.teacher is not None:
    teacher_map = teacher_heun_map(ctx.teacher, teacher_steps)
  if teacher_map is None and ctx.flow_map is not None:
    raise ValueError("Progressive distillation needs a teacher: pass teacher=b(t, x, labels).")
  return semigroup_rule(ctx, intermediate=intermediate, teacher_map=teacher_map)


def teacher_heun_map(teacher, num_steps: int = TEACHER_STEPS):
  """A teacher map from a teacher velocity: num_steps Heun steps of b from s to t (2 NFE each)."""
  def teacher_map(s, t, x, labels):
    return samplers.integrate(lambda tt, xx: teacher(tt, xx, labels), x, s, t, num_steps, 'heun')

  return teacher_map
