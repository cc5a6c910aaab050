"""Flow-map parameterizations: X_{s,t}(x), the average velocity v_{s,t}(x) and b_t(x) from a network.

A network is any pure function `apply(params, s, t, x, labels) -> array shaped like x`
(fmjax.models builds these from Flax modules). A parameterization turns it into a flow
map with the exact boundary condition X_{s,s}(x) = x (docs/notation.md):

  X_{s,t}(x) = x + (t - s) v_{s,t}(x),   b_t(x) = v_{t,t}(x)

(Boffi, Albergo & Vanden-Eijnden, "Flow map matching", arXiv 2406.07507, Sec. 2).
Every parameterization offers the same three methods, so every rule and sampler works
with each of them:

  X(params, s, t, x, labels)         the flow map
  v(params, s, t, x, labels)         the average velocity (X - x) / (t - s), exact on s = t
  velocity(params, t, x, labels)     the instantaneous velocity b_t = v_{t,t}
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp

from fmjax import interpolants as interpolants_lib
from fmjax.interpolants import expand

Params = Any
Apply = Callable[..., jax.Array]   # apply(params, s, t, x, labels) -> array like x


class FlowMap(Protocol):
  """What losses and samplers need of a flow map."""

  def X(self, params: Params, s, t, x, labels=None) -> jax.Array: ...

  def v(self, params: Params, s, t, x, labels=None) -> jax.Array: ...

  def velocity(self, params: Params, t, x, labels=None) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class DisplacementFlowMap:
  """X_{s,t}(x) = x + (t - s) net(s, t, x): the default of Boffi et al. (2406.07507, Sec. 2).

  The network output is the average velocity itself, so v and b = v_{t,t} cost one
  forward pass each and are exact on the diagonal.
  """

  apply: Apply

  def v(self, params, s, t, x, labels=None):
    return self.apply(params, s, t, x, labels)

  def X(self, params, s, t, x, labels=None):
    return x + expand(t - s, x) * self.v(params, s, t, x, labels)

  def velocity(self, params, t, x, labels=None):
    return self.apply(params, t, t, x, labels)


def to_meanflow_times(s, t):
  """(s, t) in fmjax time -> MeanFlow's (r, t) with t = 1 noise, 0 data (Geng et al. 2505.13447).

  A jump from fmjax time s to t > s (towards data) is MeanFlow's jump from its t' = 1 - s
  down to r' = 1 - t. The map is its own inverse.
  """
  return 1.0 - t, 1.0 - s


def from_meanflow_times(r, t):
  """MeanFlow's (r, t) -> fmjax (s, t): the inverse of `to_meanflow_times` (the same formula)."""
  return 1.0 - t, 1.0 - r


@dataclasses.dataclass(frozen=True)
class MeanFlowMap:
  """The network is MeanFlow's average velocity u(z, r, t) in MeanFlow's own time convention.

  MeanFlow (Geng et al. 2025, Eq. 1) samples z_r = z_t - (t - r) u(z_t, r, t) with t = 1
  noise and t = 0 data. With fmjax times s = 1 - t', t = 1 - r' this is
  X_{s,t}(x) = x - (t - s) u(x, 1 - t, 1 - s), i.e. v_{s,t}(x) = -u(x, 1 - t, 1 - s).
  `apply(params, r, t, z, labels)` receives MeanFlow's (r, t) in its two time slots, so a
  network trained by MeanFlow's code loads unchanged. The translation happens here, once.
  """

  apply: Apply

  def v(self, params, s, t, x, labels=None):
    r_mf, t_mf = to_meanflow_times(s, t)
    return -self.apply(params, r_mf, t_mf, x, labels)

  def X(self, params, s, t, x, labels=None):
    return x + expand(t - s, x) * self.v(params, s, t, x, labels)

  def velocity(self, params, t, x, labels=None):
    return self.v(params, t, t, x, labels)


_NEAR_DIAGONAL = 1e-2


def divided_difference(f, s, t):
  """(f(t) - f(s)) / (t - s), by the midpoint derivative f'((s + t) / 2) when |t - s| is small.

  The midpoint rule is second-order accurate, so both branches agree to ~1e-6 at the
  switch, and the safe denominator keeps NaNs out of gradients of the unused branch.
  """
  h = t - s
  near = jnp.abs(h) < _NEAR_DIAGONAL
  quotient = (f(t) - f(s)) / jnp.where(near, 1.0, h)
  midpoint = jax.jvp(f, (0.5 * (s + t),), (jnp.ones_like(s),))[1]
  return jnp.where(near, midpoint, quotient)


@dataclasses.dataclass(frozen=True)
class XPredictionFlowMap:
  """A preconditioned data prediction D_{s,t}(x), moved to time t like a DDIM step.

  D_{s,t}(x) = c_skip(s) x + c_out(s) F(s, t, c_in(s) x) uses EDM's preconditioning
  (Karras et al. 2022, Eq. 7 and Appendix B.6) generalized to I_s = alpha_s x0 + beta_s x1
  with data standard deviation sigma_data:
    c_in = 1 / sqrt(alpha^2 + beta^2 sd^2), c_skip = beta sd^2 c_in^2, c_out = alpha sd c_in.
  The map substitutes D for x1 (and the x0 that goes with it) in the interpolant:
    X_{s,t}(x) = (alpha_t / alpha_s) x + (beta_t - alpha_t beta_s / alpha_s) D_{s,t}(x),
  which is x at t = s exactly. alpha_s is floored at `min_alpha` so the map stays finite
  at s = 1 (the data end, where no sampler starts).
  """

  apply: Apply
  interpolant: interpolants_lib.Interpolant
  sigma_data: float = 0.5
  min_alpha: float = 1e-4

  def denoise(self, params, s, t, x, labels=None):
    a, b = self.interpolant.alpha(expand(s, x)), self.interpolant.beta(expand(s, x))
    c_in = jax.lax.rsqrt(a**2 + (b * self.sigma_data)**2)
    c_skip = b * self.sigma_data**2 * c_in**2
    c_out = a * self.sigma_data * c_in
    return c_skip * x + c_out * self.apply(params, s, t, c_in * x, labels)

  def _alpha_s(self, s, x):
    return jnp.maximum(self.interpolant.alpha(expand(s, x)), self.min_alpha)

  def X(self, params, s, t, x, labels=None):
    alpha_s = self._alpha_s(s, x)
    beta_s = self.interpolant.beta(expand(s, x))
    alpha_t, beta_t = self.interpolant.alpha(expand(t, x)), self.interpolant.beta(expand(t, x))
    d = self.denoise(params, s, t, x, labels)
    return (alpha_t / alpha_s) * x + (beta_t - alpha_t * beta_s / alpha_s) * d

  def v(self, params, s, t, x, labels=None):
    # (X - x) / (t - s) = [dd(alpha) x + dd(beta alpha_s - alpha beta_s) D] / alpha_s with
    # divided differences dd, so that v is accurate on and near the diagonal.
    s_b, t_b = expand(s, x), expand(t, x)
    alpha_s = self._alpha_s(s, x)
    beta_s = self.interpolant.beta(s_b)
    alpha = self.interpolant.alpha
    dd_alpha = divided_difference(alpha, s_b, t_b)
    dd_cross = divided_difference(lambda u: self.interpolant.beta(u) * alpha_s - alpha(u) * beta_s, s_b, t_b)
    d = self.denoise(params, s, t, x, labels)
    return (dd_alpha * x + dd_cross * d) / alpha_s

  def velocity(self, params, t, x, labels=None):
    return self.v(params, t, t, x, labels)


def make(parameterization: str, apply: Apply, interpolant=None, sigma_data: float = 0.5) -> FlowMap:
  """Builds a flow map by name: 'displacement' (default), 'meanflow' or 'x_prediction'."""
  if parameterization == 'displacement':
    return DisplacementFlowMap(apply)
  if parameterization == 'meanflow':
    return MeanFlowMap(apply)
  if parameterization == 'x_prediction':
    if interpolant is None:
      raise ValueError("The 'x_prediction' parameterization needs the interpolant.")
    return XPredictionFlowMap(apply, interpolant, sigma_data)
  raise ValueError(f'Unknown flow-map parameterization {parameterization!r}; choose '
                   "'displacement', 'meanflow' or 'x_prediction'.")
