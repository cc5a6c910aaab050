"""Look-aheads: where a noisy state x_t is going, and the reward judged there.

Three estimates of the clean sample behind x_t (docs/steering.md; arXiv 2604.27147 and
2511.22688 compare them):
  flow map   X_{t,1}(x_t)                       (sharp: the sample the ODE actually reaches),
  denoiser   E[x1 | x_t] from the velocity      (the posterior mean, blurry early on),
  naive      x_t itself.
Each is a function `look(t, x, labels) -> x1_hat` of a scalar time t, a batch x and its labels
(None when unconditional; labels travel with the particles when SMC resamples). Closures carry
the network parameters, so this module never sees a config.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fmjax.interpolants import Interpolant

FlowMapFn = Callable[..., jax.Array]    # (s, t, x, labels) -> X_{s,t}(x); s, t scalars or [batch]
VelocityFn = Callable[..., jax.Array]   # (t, x, labels) -> b_t(x)
Lookahead = Callable[..., jax.Array]    # (t, x, labels) -> x1_hat

LOOKAHEADS = ('flow_map', 'denoiser', 'naive')


def flow_map_lookahead(flow_map: FlowMapFn) -> Lookahead:
  """x -> X_{t,1}(x): one network evaluation."""
  return lambda t, x, labels=None: flow_map(t, jnp.ones_like(jnp.asarray(t)), x, labels)


def denoiser_lookahead(velocity: VelocityFn, interpolant: Interpolant) -> Lookahead:
  """x -> E[x1 | I_t = x] = (alpha_t b_t(x) - alpha'_t x) / (alpha_t beta'_t - alpha'_t beta_t):
  one network evaluation (the velocity)."""
  return lambda t, x, labels=None: interpolant.denoise(t, x, velocity(t, x, labels))


def naive_lookahead() -> Lookahead:
  """x -> x: judge the noisy state itself (zero network evaluations)."""
  return lambda t, x, labels=None: x


def make_lookahead(name: str, *, flow_map: FlowMapFn | None = None, velocity: VelocityFn | None = None,
                   interpolant: Interpolant | None = None) -> Lookahead:
  if name == 'flow_map':
    return flow_map_lookahead(flow_map)
  if name == 'denoiser':
    return denoiser_lookahead(velocity, interpolant)
  if name == 'naive':
    return naive_lookahead()
  raise ValueError(f'unknown look-ahead {name!r}; choose one of {LOOKAHEADS}.')


def lookahead_nfe(name: str) -> int:
  """Network evaluations of one look-ahead value (a gradient through it costs about twice that)."""
  return 0 if name == 'naive' else 1


def value_and_grad(look: Lookahead, reward, t, x, labels=None, *, keep_jacobian: bool = True):
  """(r(L(x)) [batch], grad_x [batch, ...]) for a look-ahead L.

  keep_jacobian=True: the exact gradient (dL/dx)^T grad r(L(x)) (one vjp through the network).
  keep_jacobian=False: grad r evaluated at L(x), dropping the map's Jacobian (cheaper, biased;
  equal to the exact gradient when L is the identity).
  """
  if keep_jacobian:
    def total(xx):
      values = reward(look(t, xx, labels), labels)
      return jnp.sum(values), values
    grad, values = jax.grad(total, has_aux=True)(x)
    return values, grad
  x1 = jax.lax.stop_gradient(look(t, x, labels))
  grad, values = jax.grad(lambda y: (jnp.sum(reward(y, labels)), reward(y, labels)), has_aux=True)(x1)
  return values, grad


def score_from_velocity(interpolant: Interpolant, t, x, velocity) -> jax.Array:
  """grad log p_t(x) from b_t(x): `Interpolant.score` (kept under this name for callers)."""
  return interpolant.score(t, x, velocity)
