"""Distillation from a teacher velocity b_t(x) (any pure function teacher(t, x, labels)).

LMD and EMD are the Lagrangian and Eulerian rules with the teacher in the target
(lagrangian.py, eulerian.py); progressive distillation is the semigroup rule with a frozen
teacher map (semigroup.py). This module adds trajectory distillation, the regression onto
the teacher's trajectories (rule 'trajectory_distillation'; 'fmm' is its deprecated alias):

  E | X_{s,t}(I_s) - sg[Phi^b_{s,t}(I_s)] |^2,

Phi^b a high-accuracy ODE solve of the teacher (`ode_steps` steps of `ode_method`): the
direct regression of Luhman & Luhman (2021, "Knowledge distillation in iterative generative
models"; equation not checked), generalized to every pair (s, t). In Boffi et al.
2406.07507 "flow map matching" names the framework (abstract); the paper relates its losses
to such ODE-solution regression but its own distillation losses are LMD / EMD (rules 'lmd',
'emd'), which reach the same minimizer without solving the ODE (section and equation
numbers not checked).
"""

from __future__ import annotations

from fmjax import samplers
from fmjax.losses import base
from fmjax.losses import times as times_lib

sg = base.sg


def trajectory_rule(ctx: base.Context, ode_steps: int = 16, ode_method: str = 'heun'):
  """E |X_{s,t}(I_s) - sg[Phi^b_{s,t}(I_s)]|^2 (module docstring), Phi^b by samplers.integrate."""
  fm = ctx.flow_map

  def off_diagonal(params, rows, key, step):
    del step
    s, t = times_lib.sample_pairs(key, rows.x1.shape[0], ctx.options.times)
    x_s = ctx.interpolant.sample(s, rows.x0, rows.x1)
    target = samplers.integrate(lambda tt, xx: ctx.teacher(tt, xx, rows.labels), x_s, s, t,
                                ode_steps, ode_method, unroll=True)
    error = fm.X(params['net'], s, t, x_s, rows.labels) - sg(target)
    return base.mean_square(error), s, t, {}

  return base.two_part_rule(ctx, off_diagonal)
