"""Sequential Monte Carlo along a guided SDE with a look-ahead twist: samples q ∝ p exp(r / lambda).

The base process is an SDE with the marginals p_t of the probability-flow ODE dx = b_t(x) dt,
  dx = [b_t(x) + eps_t s_t(x)] dt + sqrt(2 eps_t) dW,      s_t = grad log p_t
(the score comes from the velocity through the interpolant, `Interpolant.score`; this
is the SDE of FMTT, arXiv 2511.22688, Sec. 2, and of stochastic interpolants, arXiv 2303.08797).
eps_t = noise * alpha_t^2: the noise vanishes at the data end, where the score is singular, and a
Langevin step eps_t h stays below noise * h times the variance alpha_t^2 that every local mode of
p_t has at least (the linear interpolant), so its O(eps h) bias stays small.

Twist (docs/steering.md): V_t(x) = r(L_t(x)) / lambda with a look-ahead L_t (the flow map
X_{t,1}, the denoiser E[x1 | x_t], or x_t itself). The proposal adds the control
  u_t(x) = guidance_scale * strength(t) * 2 eps_t grad V_t(x),
the Doob h-transform drift sigma^2 grad log h_t with h_t ≈ exp(V_t) (zero after guidance_stop),
its step h |u| capped at control_clip noise stds (near a boundary between modes the flow map's
Jacobian is huge, and uncapped controls make the weights heavy-tailed: measured on the exact
3-mode mixture of the tests, the normalizer estimate came out 6% low (4 standard errors) without
the cap and unbiased with it; the weights stay exact for the capped proposal).
On the grid t_0 = 0 < ... < t_N = 1 the particles carry the twisted-SMC log-weights
  log w_0 = V_0(x_0),
  log w_{k+1} - log w_k = V_{k+1}(x_{k+1}) - V_k(x_k) + log K(x_{k+1} | x_k) - log K_u(x_{k+1} | x_k),
with V_N = r / lambda at t_N = 1, K the unguided Gaussian kernel N(m, sigma^2 I) and K_u the
guided one N(m + h u, sigma^2 I): for x_{k+1} = m + h u + sigma z,
  log K - log K_u = -h^2 |u|^2 / (2 sigma^2) - h u.z / sigma.
The sum telescopes to r(x_N) / lambda + sum log(K / K_u): the path law of the guided chain,
reweighted, is the unguided chain's path law tilted by exp(r(x_N) / lambda), whose x_N-marginal is
q when the chain's marginal at t = 1 is p. That is the twisted-SMC construction (Wu et al.,
"Practical and asymptotically exact conditional sampling in diffusion models", arXiv 2306.17775,
read: abstract and the weight form twist ratio x kernel ratio; its equation numbers not checked),
with FMTT's flow-map look-ahead as the twist (arXiv 2511.22688; its exact weight formula not
checked: the derivation above is ours, tested against closed forms in tests/test_steering_smc.py).
The Jarzynski-style increments V_{k+1} - V_k are the discrete form of the integral of
d/dt r(X_{t,1}(x_t)) / lambda along the path.

Two discretizations of the base SDE (`transport`):
  'flow_map' (default): the ODE part by the flow map's jump X_{t_k, t_{k+1}}, then the score/noise
    part as one Langevin step at t_{k+1} (operator splitting; the Langevin part keeps p_{t_{k+1}}
    up to O(eps h)). With an exact flow map the noise-free chain is exact at any step count.
    The last step (to t = 1, no noise) reuses the flow-map look-ahead's X_{t,1} when both are
    the flow map.
  'euler': Euler-Maruyama on b + eps s (one velocity per step).
Resampling is systematic, within groups of num_particles rows, when a group's effective sample
size falls below ess_threshold * num_particles; resampled groups restart from equal weights.
Labels travel with their particles (SMCOutput.labels: each returned row's label).

What it targets: the x_N-marginal of the *discrete* unguided chain, tilted. With an exact flow map
the jumps are exact, but a Langevin step of size eps h leaves p_t's variance sigma^2 as
sigma^2 (1 + a^2), a = h eps / sigma^2 (for a Gaussian; O((eps h)^2) per step in general), so the
chain's law at t = 1 is not p and no number of particles removes that bias; more steps or less
noise shrink it (docs/steering.md measures it; benchmarks/smc_chain_bias.py).

Non-finite rewards: -inf is a hard constraint (weight zero at the end, never resampled into; a
look-ahead outside it gets a finite stand-in twist, `_finite_twist`); a group whose final rewards
are all -inf, and any NaN / +inf reward or NaN gradient, is an error: counted inside jit
(SMCOutput.reward_check) and raised at once when `smc` runs outside jit (under jit: call
fmjax.steering.result.raise_on_bad_rewards('smc', out.reward_check) on the result).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.interpolants import Interpolant
from fmjax.steering import lookahead as lookahead_lib
from fmjax.steering.methods import SMCOptions   # the options and their checks
from fmjax.steering.reward_guidance import strength   # one schedule convention for guidance and SMC
from fmjax.steering.resampling import ess_fraction, systematic_resample
from fmjax.steering.result import SteerResult, merge_checks, raise_on_bad_rewards, reward_check


class SMCOutput(NamedTuple):
  """samples [num, ...] (after the final resampling when requested); log_weights [num] (normalized
  within each group); ess [num_steps + 1] (mean over groups of the ESS fraction of the weights
  before each resampling decision; the last entry is the final weights'); log_normalizer [groups]
  (the SMC estimate of log E_chain[exp(r(x_1) / lambda)], unbiased in exp); resampled [num_steps]
  (share of groups resampled at each step); nfe (network evaluations per particle); labels [num]
  (each returned row's label: its ancestor's, None when unconditional); reward_check
  (fmjax.steering.result.reward_check over every reward evaluation: NaN / +inf rows at the worst
  step, groups whose final rewards are all -inf)."""

  samples: jax.Array
  log_weights: jax.Array
  ess: jax.Array
  log_normalizer: jax.Array
  resampled: jax.Array
  nfe: int
  labels: Optional[jax.Array] = None
  reward_check: Optional[jax.Array] = None


def _look_value_grad(look, reward, t, x, labels, *, need_grad: bool, keep_jacobian: bool):
  """(x1_hat, r(x1_hat) [batch], grad_x r(L(x)) or zeros): like lookahead.value_and_grad, but it
  also returns the look-ahead output (the flow-map transport reuses it on the last step)."""
  if not need_grad:
    x1 = look(t, x, labels)
    return x1, reward(x1, labels), jnp.zeros_like(x)
  reward_grad = jax.grad(lambda y: (jnp.sum(reward(y, labels)), reward(y, labels)), has_aux=True)
  if keep_jacobian:
    x1, pullback = jax.vjp(lambda xx: look(t, xx, labels), x)
    g1, values = reward_grad(x1)
    return x1, values, pullback(g1)[0]
  x1 = jax.lax.stop_gradient(look(t, x, labels))
  g1, values = reward_grad(x1)
  return x1, values, g1


def _alpha(interpolant, t: float) -> float:
  """alpha_t as a Python float, even while tracing (the noise level is static per step)."""
  with jax.ensure_compile_time_eval():
    return float(interpolant.alpha(jnp.float32(t)))


def _take(tree, idx):
  return jax.tree_util.tree_map(lambda a: None if a is None else a[idx], tree)


def _check(x0, num_particles, num_steps, flow_map, velocity, lookahead, transport):
  """The inputs beyond the options (SMCOptions checks those): shapes and the networks."""
  if x0.ndim < 2:
    raise ValueError(f'x0 must be a batch [num, ...] of noise, got shape {x0.shape}.')
  if x0.shape[0] % num_particles:
    raise ValueError(f'x0 has {x0.shape[0]} rows: that must be a positive multiple of '
                     f'num_particles={num_particles} (resampling happens within groups of that size).')
  if int(num_steps) < 1:
    raise ValueError(f'num_steps must be >= 1, got {num_steps}.')
  if velocity is None:
    raise ValueError('smc_sample needs velocity(t, x, labels) (the score comes from it).')
  if flow_map is None and (lookahead == 'flow_map' or transport == 'flow_map'):
    raise ValueError("the flow-map look-ahead and transport='flow_map' need flow_map(s, t, x, labels); "
                     "pass one or use lookahead='denoiser' and transport='euler'.")


def smc(key, x0, *, flow_map, velocity, interpolant: Interpolant, reward, temperature: float,
        num_steps: int, num_particles: int, lookahead: str = 'flow_map', keep_jacobian: bool = True,
        guidance_scale: float = 1.0, guidance_stop: float = 1.0, schedule: str = 'constant',
        ess_threshold: float = 0.5, labels=None, noise: float = 0.5, transport: str = 'flow_map',
        final_resample: bool = True, times=None, control_clip: Optional[float] = 1.0) -> SMCOutput:
  """Twisted SMC on the guided SDE (module docstring); the full output (see SMCOutput).

  Every option is static (a Python value): per-step flags (guided or not, noisy or not, the
  last flow-map step reusing the look-ahead) are decided at trace time, and each run of steps
  with equal flags is one lax.scan, so the compile time does not grow with num_steps.
  control_clip: cap on the control's step h |u| in noise stds (None: uncapped).
  times: an optional increasing grid from 0 to 1 (num_steps + 1 points; default uniform).
  """
  SMCOptions(temperature=temperature, num_particles=num_particles, lookahead=lookahead,
             keep_jacobian=keep_jacobian, guidance_scale=guidance_scale, guidance_stop=guidance_stop,
             schedule=schedule, ess_threshold=ess_threshold, noise=noise, transport=transport,
             final_resample=final_resample)   # one ValueError on a bad option
  _check(x0, num_particles, num_steps, flow_map, velocity, lookahead, transport)
  num = x0.shape[0]
  groups = num // num_particles
  grid = np.linspace(0.0, 1.0, num_steps + 1) if times is None else np.asarray(times, np.float64)
  if grid.shape != (num_steps + 1,) or grid[0] != 0 or grid[-1] != 1 or (np.diff(grid) <= 0).any():
    raise ValueError(f'times must increase from 0 to 1 in num_steps + 1 = {num_steps + 1} points.')
  look = lookahead_lib.make_lookahead(lookahead, flow_map=flow_map, velocity=velocity,
                                      interpolant=interpolant)
  lam = float(temperature)
  grouped = lambda a: a.reshape(groups, num_particles)

  def step(carry, inputs, *, guide: bool, move_noise: bool, reuse: bool):
    """One grid step; the flags are static per segment of steps, the times and levels traced."""
    key, x, lab, log_w, log_z, v_prev, correction, checked = carry
    t, t_next, eps, scale = inputs
    h = t_next - t
    # 1. The twist at the current state, and the weight increment of the move that led here.
    x1_hat, values, grad = _look_value_grad(look, reward, t, x, lab, need_grad=guide,
                                            keep_jacobian=keep_jacobian)
    feasible = values > -jnp.inf
    # No control from a look-ahead outside a hard constraint (its gradient means nothing there).
    grad = jnp.where(feasible.reshape((-1,) + (1,) * (x.ndim - 1)), grad, 0.0)
    grad_bad = jnp.where(feasible & ~jnp.all(jnp.isfinite(grad.reshape(num, -1)), -1), jnp.nan, 0.0)
    checked = merge_checks(checked, reward_check(values + grad_bad))
    v_now = _finite_twist(values / lam, grouped)
    increment = v_now - v_prev + correction
    prev, log_w = log_w, log_w + increment
    # The standard SMC estimate of the normalizer: the weighted mean increment, per group.
    log_z = log_z + (jax.scipy.special.logsumexp(grouped(log_w), -1)
                     - jax.scipy.special.logsumexp(grouped(prev), -1))
    # 2. Resample the groups whose ESS fell below the threshold (they restart from equal weights).
    ess = ess_fraction(grouped(log_w))
    key, key_r, key_n = jax.random.split(key, 3)
    do = ess < ess_threshold
    idx = jax.vmap(systematic_resample)(jax.random.split(key_r, groups), grouped(log_w))
    idx = jnp.where(do[:, None], idx, jnp.arange(num_particles)[None])
    idx = (idx + num_particles * jnp.arange(groups)[:, None]).reshape(-1)
    x, lab, x1_hat, v_now, grad = _take((x, lab, x1_hat, v_now, grad), idx)
    log_w = jnp.where(jnp.repeat(do, num_particles), 0.0, log_w[idx])
    # 3. Move: the unguided mean m (the noise acts at t_{k+1} for the flow-map transport, at t_k
    # for Euler-Maruyama), then the control u and the noise; `correction` is log K - log K_u.
    if transport == 'flow_map':
      m = x1_hat if reuse else flow_map(t, t_next, x, lab)      # reuse: X_{t,1}(x), computed
      if move_noise:
        m = m + h * eps * interpolant.score(t_next, m, velocity(t_next, m, lab))
    else:
      b = velocity(t, x, lab)
      m = x + h * b
      if move_noise:
        m = m + h * eps * interpolant.score(t, x, b)
    if move_noise:
      sigma = jnp.sqrt(2 * eps * h)
      z = jax.random.normal(key_n, x.shape, x.dtype)
      u = 2 * eps * scale * grad / lam
      if control_clip is not None:
        # Near a boundary between modes X_{t,1} has a huge Jacobian, so grad V and u can be
        # huge and log K / K_u heavy-tailed. Capping the shift h |u| at control_clip noise
        # stds bounds that log-ratio; the weights stay exact for the capped proposal.
        size = h * jnp.sqrt(jnp.sum(u**2, tuple(range(1, x.ndim)), keepdims=True))
        u = u * jnp.minimum(1.0, control_clip * sigma / jnp.maximum(size, 1e-30))
      x = m + h * u + sigma * z
      axes = tuple(range(1, x.ndim))
      correction = -(h**2) * jnp.sum(u**2, axes) / (2 * sigma**2) - h * jnp.sum(u * z, axes) / sigma
    else:
      x, correction = m, jnp.zeros((num,))
    carry = (key, x, lab, log_w, log_z, v_now, correction, checked)
    return carry, (jnp.mean(ess), jnp.mean(do.astype(jnp.float32)))

  # Per-step static flags; consecutive steps with equal flags run as one lax.scan (one compiled
  # body), so the compile time does not grow with num_steps. This is not the jump-then-hook loop
  # of fmjax.samplers.flow_map_steps: each step weighs and resamples *before* it moves, the move's
  # control comes from the pre-jump state, and the last jump may be the look-ahead's X_{t,1}.
  plan = _plan(grid, interpolant, noise, guidance_scale, guidance_stop, schedule, lookahead,
               keep_jacobian, transport)
  carry = (key, x0, labels, jnp.zeros((num,)), jnp.zeros((groups,)), jnp.zeros((num,)),
           jnp.zeros((num,)), jnp.zeros((4,), jnp.int32))
  ess_trace, resampled_trace = [], []
  nfe = 0
  for flags, steps in _segments(plan):
    inputs = tuple(jnp.asarray([row[i] for row in steps], jnp.float32) for i in range(4))
    body = functools.partial(step, guide=flags[0], move_noise=flags[1], reuse=flags[2])
    carry, (ess, resampled) = jax.lax.scan(body, carry, inputs)
    ess_trace.append(ess)
    resampled_trace.append(resampled)
    nfe += sum(row[4] for row in steps)
  key, x, lab, log_w, log_z, v_prev, correction, checked = carry
  # Final weights: the true reward at t = 1 replaces the last look-ahead value; a reward of -inf
  # (outside a hard constraint) gives the particle weight zero here, whatever its twist was.
  final = reward(x, lab)
  checked = merge_checks(checked, reward_check(final, grouped(final)))
  increment = final / lam - v_prev + correction
  prev, log_w = log_w, log_w + increment
  log_z = log_z + (jax.scipy.special.logsumexp(grouped(log_w), -1)
                   - jax.scipy.special.logsumexp(grouped(prev), -1))
  ess_trace.append(jnp.mean(ess_fraction(grouped(log_w)))[None])
  log_w = (grouped(log_w) - jax.scipy.special.logsumexp(grouped(log_w), -1, keepdims=True)).reshape(-1)
  if final_resample:
    key, key_r = jax.random.split(key)
    idx = jax.vmap(systematic_resample)(jax.random.split(key_r, groups), grouped(log_w))
    idx = (idx + num_particles * jnp.arange(groups)[:, None]).reshape(-1)
    x, lab = _take((x, lab), idx)
    log_w = jnp.full((num,), -np.log(num_particles), jnp.float32)
  out = SMCOutput(x, log_w, jnp.concatenate(ess_trace), log_z, jnp.concatenate(resampled_trace),
                  nfe, lab, checked)
  raise_on_bad_rewards('smc', checked)        # called outside jit: one clear error at once
  return out


def _finite_twist(v, grouped):
  """The twist V_t = r(L_t(x)) / lambda with -inf (a look-ahead outside a hard constraint)
  replaced by the mean finite twist of the particle's group (0 if none is finite).

  Twisted SMC targets the same law for any finite twist (the final weight uses r itself, and
  the twist telescopes away), so the stand-in changes the variance, not the target. -inf
  would kill particles that the look-ahead merely guesses to end outside (it is approximate,
  and the noise still moves them), and -inf - (-inf) on the next step would be NaN. The group
  mean, not its minimum: measured on a Gaussian with the constraint x_0 >= 0 (lambda 0.37,
  4 steps, 128 groups of 256), the minimum biased the weighted mean of x_0 by +0.06 (12
  standard errors: particles near the boundary were resampled away although many end inside),
  the mean by +0.003 (0.5 standard errors)."""
  g = grouped(v)
  finite = jnp.isfinite(g)
  floor = (jnp.sum(jnp.where(finite, g, 0.0), -1, keepdims=True)
           / jnp.maximum(jnp.sum(finite, -1, keepdims=True), 1))
  return jnp.where(g == -jnp.inf, floor, g).reshape(v.shape)


def _plan(grid, interpolant, noise, guidance_scale, guidance_stop, schedule, lookahead,
          keep_jacobian, transport):
  """Per step: ((guide, move_noise, reuse), t, t_next, eps, scale, nfe), all Python values."""
  look_nfe = lookahead_lib.lookahead_nfe(lookahead)
  rows = []
  for k in range(len(grid) - 1):
    t, t_next = float(grid[k]), float(grid[k + 1])
    eps = noise * _alpha(interpolant, t_next if transport == 'flow_map' else t)**2
    scale = guidance_scale * strength(schedule, t) if t < guidance_stop else 0.0
    # No noise into t = 1 with the flow-map transport: the score is singular there.
    move_noise = eps > 0 and not (transport == 'flow_map' and t_next == 1.0)
    guide = move_noise and scale != 0
    reuse = transport == 'flow_map' and lookahead == 'flow_map' and t_next == 1.0
    nfe = look_nfe * (2 if guide and keep_jacobian else 1)       # value, or value + vjp
    nfe += 0 if reuse else 1                                      # the jump, or the velocity
    nfe += 1 if transport == 'flow_map' and move_noise else 0     # the velocity for the score
    rows.append(((guide, move_noise, reuse), t, t_next, eps, scale if guide else 0.0, nfe))
  return rows


def _segments(plan):
  """Consecutive steps with equal static flags: [(flags, [(t, t_next, eps, scale, nfe), ...])]."""
  out = []
  for flags, *rest in plan:
    if out and out[-1][0] == flags:
      out[-1][1].append(tuple(rest))
    else:
      out.append((flags, [tuple(rest)]))
  return out


def smc_nfe(num_steps: int, *, lookahead: str = 'flow_map', keep_jacobian: bool = True,
            guidance_scale: float = 1.0, guidance_stop: float = 1.0, schedule: str = 'constant',
            noise: float = 0.5, transport: str = 'flow_map', interpolant: Optional[Interpolant] = None,
            times=None) -> int:
  """The network evaluations per particle that `smc` reports, without running it."""
  from fmjax import interpolants as interpolants_lib
  grid = np.linspace(0.0, 1.0, num_steps + 1) if times is None else np.asarray(times, np.float64)
  plan = _plan(grid, interpolant or interpolants_lib.linear(), noise, guidance_scale,
               guidance_stop, schedule, lookahead, keep_jacobian, transport)
  return sum(row[-1] for row in plan)


def smc_sample(key, x0, *, flow_map, velocity, interpolant: Interpolant, reward, temperature: float,
               num_steps: int, num_particles: int, lookahead: str = 'flow_map',
               keep_jacobian: bool = True, guidance_scale: float = 1.0, guidance_stop: float = 1.0,
               schedule: str = 'constant', ess_threshold: float = 0.5, labels=None,
               noise: float = 0.5, transport: str = 'flow_map', final_resample: bool = True,
               times=None, control_clip: Optional[float] = 1.0) -> SteerResult:
  """SMC sampling of q ∝ p exp(r / lambda) (STEER_API): x0 [num, ...] noise at t = 0, split into
  groups of num_particles rows. Returns SteerResult(samples, log_weights, ess, nfe): with
  final_resample=True (default) the samples are resampled by the final weights and log_weights
  are uniform; ess has num_steps + 1 entries (the last: the final weights, before resampling)."""
  out = smc(key, x0, flow_map=flow_map, velocity=velocity, interpolant=interpolant, reward=reward,
            temperature=temperature, num_steps=num_steps, num_particles=num_particles,
            lookahead=lookahead, keep_jacobian=keep_jacobian, guidance_scale=guidance_scale,
            guidance_stop=guidance_stop, schedule=schedule, ess_threshold=ess_threshold,
            labels=labels, noise=noise, transport=transport, final_resample=final_resample,
            times=times, control_clip=control_clip)
  return SteerResult(out.samples, out.log_weights, out.ess, out.nfe, out.labels, out.reward_check)
