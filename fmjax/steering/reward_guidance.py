"""Look-ahead reward-gradient guidance toward q(x) ∝ p(x) exp(r(x) / lambda) (best-of-N, the
baseline, is fmjax.steering.selection; classifier-free guidance is fmjax.samplers.classifier_free_guidance).

Guided sampling. With x0 ~ N(0, I) independent of x1 ~ q, the tilted marginals are
q_t = p_t h_t / Z with h_t(x) = E_p[exp(r(x1) / lambda) | I_t = x], so score_q = score_p + grad log h_t.
For I_t = alpha_t x0 + beta_t x1 the velocity is an affine function of the score
(`Interpolant.velocity_from_score`, the inverse of `Interpolant.score`):
b = (beta'_t x + alpha_t (alpha_t beta'_t - alpha'_t beta_t) score) / beta_t,
hence the exact tilted velocity is
  b^q_t(x) = b_t(x) + k_t grad log h_t(x),   k_t = alpha_t (alpha_t beta'_t - alpha'_t beta_t) / beta_t
(linear interpolant: k_t = (1 - t) / t). Our derivation; the look-ahead approximation
log h_t(x) ≈ r(L_t(x)) / lambda gives the control
  u_t(x) = guidance_scale * strength(t) * k_t * grad_x r(L_t(x)) / lambda,
which is exact (guidance_scale = 1, constant schedule) for a Gaussian p, a linear reward
r(x) = a.x and the denoiser look-ahead L_t = E[x1 | x_t] with its Jacobian kept: then
log h_t = a.E[x1 | x_t] / lambda + const because Cov[x1 | x_t] does not depend on x_t
(tests/test_steering_guidance.py checks the tilted law N(m + s^2 a / lambda, s^2)). For a
quadratic reward it is an approximation (the reward's variance lambda sigma^2 stands in for
lambda sigma^2 + Var[x1 | x_t]); the flow-map look-ahead X_{t,1} replaces the posterior mean by
the point the ODE reaches ("How to guide your flow", arXiv 2604.27147; "Test-time scaling of
diffusions with flow maps", arXiv 2511.22688: both use grad r(X_{t,1}(x)) as the guidance
direction; their exact scalings and equation numbers not checked; 2604.27147 poses guidance as
deterministic optimal control rather than tilted sampling, read: abstract only). Caveat measured
in the tests: grad_x r(X_{t,1}(x)) does not vanish as t -> 0 while the true grad log h_t does
(x_0 is independent of x1), so with the flow-map or naive look-ahead the summed gain
sum_k h k_{t_k} grows like log K with the step count K: stronger than the tilt, for few steps a
usable strength (guidance_scale tunes it), not a sampler of q.

Discretization (operator splitting, the FMRG pattern of arXiv 2604.27147,
not checked against the paper; `fmjax.samplers.flow_map_steps` with the guidance step as its
per-step hook): on a grid 0 = t_0 < ... < t_K = 1,
  y = X_{t_k, t_{k+1}}(x_k)                      (flow-map jump; or an Euler step on b),
  x_{k+1} = y + (t_{k+1} - t_k) u_{t_{k+1}}(y)   (guidance step at the new time).
Evaluating u after the jump avoids t = 0, where k_t is singular (beta_0 = 0); at t = 1, k_1 = 0
(alpha_1 = 0), so no guidance is spent there. First order in the step.
NFE per sample (exact, static): one per jump, plus per guided step 2 x the look-ahead's
evaluations with the Jacobian kept (forward + vjp), 1 x without, 0 for the naive look-ahead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import samplers
from fmjax.interpolants import Interpolant, expand
from fmjax.steering import lookahead as lookahead_lib
from fmjax.steering.methods import SCHEDULES, GuidanceOptions   # the options and their checks
from fmjax.steering.result import SteerResult, merge_checks, raise_on_bad_rewards, reward_check


def strength(schedule: str, t: float) -> float:
  """Guidance strength over time: 'constant' 1; 'linear' 1 - t (strong early, off at the data).
  Same convention as fmjax.steering.smc."""
  if schedule == 'constant':
    return 1.0
  if schedule == 'linear':
    return 1.0 - float(t)
  raise ValueError(f'unknown guidance schedule {schedule!r}; choose one of {SCHEDULES}.')


def control_gain(interpolant: Interpolant, t: float) -> float:
  """k_t = alpha_t (alpha_t beta'_t - alpha'_t beta_t) / beta_t: b^q - b = k_t grad log h_t.

  The velocity is affine in the score with slope k_t, so k_t is the velocity of score 1 at x = 0.
  """
  with jax.ensure_compile_time_eval():
    t = jnp.float32(t)
    if float(interpolant.beta(t)) == 0:
      raise ValueError('the guidance gain is singular at beta_t = 0 (t = 0); guide at t > 0.')
    return float(interpolant.velocity_from_score(t, jnp.float32(0.0), jnp.float32(1.0)))


# ------------------------------------------------------------------ guided ODE


def guidance_plan(times, interpolant: Interpolant, *, lookahead: str = 'flow_map',
                  keep_jacobian: bool = True, guidance_scale: float = 1.0,
                  guidance_stop: float = 1.0, schedule: str = 'constant'):
  """Per step (s, t, weight, nfe) as Python values: weight multiplies grad_x r(L_t(y)) / lambda
  (0 = no guidance step); nfe the step's network evaluations."""
  grid = np.asarray(times, np.float64)
  if grid.ndim != 1 or grid.shape[0] < 2 or np.any(np.diff(grid) <= 0) or grid[0] < 0 or grid[-1] > 1:
    raise ValueError(f'times must be a strictly increasing grid in [0, 1], got {grid.tolist()}.')
  GuidanceOptions(lookahead=lookahead, keep_jacobian=keep_jacobian, guidance_scale=guidance_scale,
                  guidance_stop=guidance_stop, schedule=schedule)   # one ValueError on a bad option
  grad_nfe = lookahead_lib.lookahead_nfe(lookahead) * (2 if keep_jacobian else 1)
  rows = []
  for s, t in zip(grid[:-1], grid[1:]):
    s, t = float(s), float(t)
    weight = 0.0
    if t < guidance_stop:
      weight = (t - s) * guidance_scale * strength(schedule, t) * control_gain(interpolant, t)
      weight = 0.0 if abs(weight) < 1e-9 else weight   # e.g. alpha_1 = 0 up to rounding
    rows.append((s, t, weight, 1 + (grad_nfe if weight != 0.0 else 0)))
  return rows


def guided_nfe(times, interpolant: Interpolant, **options) -> int:
  """The network evaluations per sample that `guided_sample` reports, without running it."""
  return sum(row[-1] for row in guidance_plan(times, interpolant, **options))


def guided_sample(x0, *, flow_map, velocity, interpolant: Interpolant, reward, temperature: float,
                  times, lookahead: str = 'flow_map', keep_jacobian: bool = True,
                  guidance_scale: float = 1.0, guidance_stop: float = 1.0,
                  schedule: str = 'constant', labels=None, transport: str = 'flow_map') -> SteerResult:
  """Look-ahead gradient guidance along the flow map (or the ODE) from noise x0 [num, ...].

  times: a concrete increasing grid from 0 to 1 (its steps are unrolled; under jax.jit pass it
    as a static tuple); transport: 'flow_map' (jumps X_{t_k, t_{k+1}}) or 'euler' (steps on b);
  lookahead / keep_jacobian: see fmjax.steering.lookahead.value_and_grad; guidance_stop: no
  guidance at times >= guidance_stop (1.0: guided all the way); schedule: `strength`.
  Returns SteerResult(samples, None, None, nfe) with the exact per-sample NFE. Guidance has no
  weights, so a hard constraint (reward -inf) is not enforced: a look-ahead outside it adds no
  control. A NaN or +inf reward or gradient is an error (as in best_of_n).
  """
  GuidanceOptions(temperature=temperature, transport=transport)   # the rest: guidance_plan below
  if transport == 'flow_map' and flow_map is None:
    raise ValueError("transport='flow_map' needs a flow_map(s, t, x, labels).")
  if (transport == 'euler' or lookahead == 'denoiser') and velocity is None:
    raise ValueError('the Euler transport and the denoiser look-ahead need velocity(t, x, labels).')
  if lookahead == 'flow_map' and flow_map is None:
    raise ValueError("lookahead='flow_map' needs a flow_map(s, t, x, labels).")
  plan = guidance_plan(times, interpolant, lookahead=lookahead, keep_jacobian=keep_jacobian,
                       guidance_scale=guidance_scale, guidance_stop=guidance_stop,
                       schedule=schedule)
  look = lookahead_lib.make_lookahead(lookahead, flow_map=flow_map, velocity=velocity,
                                      interpolant=interpolant)

  def euler_step(s, t, x, labels):
    return x + expand(t - s, x) * velocity(s, x, labels)

  def guide(i, s, t, x_before, x, checked):
    """The guidance step at the new time t (module docstring); the plan's weight is static."""
    weight = plan[i][2]
    if weight == 0.0:
      return x, checked
    values, grad = lookahead_lib.value_and_grad(look, reward, t, x, labels,
                                                keep_jacobian=keep_jacobian)
    feasible = (values > -jnp.inf).reshape((-1,) + (1,) * (x.ndim - 1))
    grad = jnp.where(feasible, grad, 0.0)
    grad_bad = jnp.where(jnp.all(jnp.isfinite(grad.reshape(x.shape[0], -1)), -1), 0.0, jnp.nan)
    step_check = reward_check(values + grad_bad)
    checked = step_check if checked is None else merge_checks(checked, step_check)
    x = x + (weight / temperature) * grad
    return x, checked

  grid = [plan[0][0]] + [row[1] for row in plan]
  x, checked = samplers.flow_map_steps(flow_map if transport == 'flow_map' else euler_step, x0,
                                       grid, labels, step_hook=guide, unroll=True)
  raise_on_bad_rewards('guidance', checked)
  return SteerResult(x, None, None, sum(row[-1] for row in plan), reward_check=checked)
