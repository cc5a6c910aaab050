"""Toy targets with ground truth: exact velocities and flow maps to test every rule against.

- Gaussian N(m, diag(sigma^2)): for any interpolant I_t = alpha_t x0 + beta_t x1 the marginal
  is N(mu_t, diag(std_t^2)) with mu_t = beta_t m, std_t^2 = alpha_t^2 + beta_t^2 sigma^2, and
  the flow map is affine per dimension (monotone transport between 1-D Gaussians):
    X_{s,t}(x) = mu_t + (std_t / std_s) (x - mu_s),   b_t(x) = mu'_t + (std'_t / std_t)(x - mu_t).
- Gaussian mixture sum_k w_k N(m_k, sigma_k^2 I): the velocity is closed-form,
    b_t(x) = sum_k pi_k(x) [alpha'_t E_k[x0 | x] + beta'_t E_k[x1 | x]],
  pi_k the posterior of component k given I_t = x (Albergo et al. 2303.08797, Sec. 5), and the
  flow map is a high-accuracy RK4 solve of it.
- Checkerboard and rings: 2-D pictures, sampling only.
All samplers are jittable pure functions of a PRNG key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import flow_maps, samplers
from fmjax.interpolants import Interpolant, expand


def _coefficients(interpolant: Interpolant, t, x):
  t = expand(t, x)
  return (interpolant.alpha(t), interpolant.beta(t), interpolant.alpha_dot(t),
          interpolant.beta_dot(t))


@dataclasses.dataclass(frozen=True)
class GaussianTarget:
  """N(mean, diag(std^2)) in `dim` dimensions, with its exact flow map for any interpolant."""

  mean: Any
  std: Any

  @property
  def dim(self) -> int:
    return int(np.asarray(self.mean).shape[-1])

  def sample(self, key, n: int):
    mean, std = jnp.asarray(self.mean, jnp.float32), jnp.asarray(self.std, jnp.float32)
    return mean + std * jax.random.normal(key, (n, self.dim))

  def marginal(self, interpolant: Interpolant, t, x):
    """(mu_t, std_t, mu'_t, std'_t) broadcast against x."""
    a, b, ad, bd = _coefficients(interpolant, t, x)
    mean, std = jnp.asarray(self.mean, jnp.float32), jnp.asarray(self.std, jnp.float32)
    var = a**2 + (b * std)**2
    std_t = jnp.sqrt(var)
    return b * mean, std_t, bd * mean, (a * ad + b * bd * std**2) / std_t

  def flow_map(self, interpolant: Interpolant, s, t, x):
    mu_s, std_s, _, _ = self.marginal(interpolant, s, x)
    mu_t, std_t, _, _ = self.marginal(interpolant, t, x)
    return mu_t + (std_t / std_s) * (x - mu_s)

  def velocity(self, interpolant: Interpolant, t, x):
    mu, std, dmu, dstd = self.marginal(interpolant, t, x)
    return dmu + (dstd / std) * (x - mu)


@dataclasses.dataclass(frozen=True)
class GaussianMixtureTarget:
  """sum_k weights_k N(means_k, stds_k^2 I); means [K, D], stds [K], weights [K]."""

  means: Any
  stds: Any
  weights: Any
  ode_steps: int = 256

  def __post_init__(self):
    means = np.asarray(self.means, np.float32)
    stds, weights = np.asarray(self.stds, np.float32), np.asarray(self.weights, np.float32)
    if means.ndim != 2:
      raise ValueError(f'means must be K x D, got shape {means.shape}.')
    if stds.shape != (means.shape[0],) or weights.shape != (means.shape[0],):
      raise ValueError(f'stds and weights must have shape ({means.shape[0]},) to match means '
                       f'{means.shape}; got {stds.shape} and {weights.shape}.')
    if (stds <= 0).any() or (weights < 0).any() or weights.sum() <= 0:
      raise ValueError('stds must be positive and weights non-negative with a positive sum.')
    object.__setattr__(self, 'means', means)
    object.__setattr__(self, 'stds', stds)
    object.__setattr__(self, 'weights', weights / weights.sum())

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  def sample(self, key, n: int):
    key_c, key_n = jax.random.split(key)
    k = jax.random.categorical(key_c, jnp.log(jnp.asarray(self.weights)), shape=(n,))
    means, stds = jnp.asarray(self.means), jnp.asarray(self.stds)
    return means[k] + stds[k, None] * jax.random.normal(key_n, (n, self.dim))

  def velocity(self, interpolant: Interpolant, t, x):
    """Closed-form b_t(x) = E[dI_t/dt | I_t = x] for x of shape [batch, D]."""
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    a, b, ad, bd = (c[:, None] if c.ndim else c for c in _coefficients(interpolant, t, x))
    means = jnp.asarray(self.means)[None]                   # [1, K, D]
    var_k = jnp.asarray(self.stds)[None, :]**2              # [1, K]
    marginal_var = a[..., 0]**2 + b[..., 0]**2 * var_k      # [B or 1, K]
    centered = x[:, None, :] - b * means                    # [B, K, D]
    log_post = (jnp.log(jnp.asarray(self.weights))[None]
                - 0.5 * jnp.sum(centered**2, -1) / marginal_var
                - 0.5 * self.dim * jnp.log(marginal_var))
    post = jax.nn.softmax(log_post, axis=-1)                # [B, K]
    gain = centered / marginal_var[..., None]
    e_x1 = means + (b * var_k[..., None]) * gain            # E_k[x1 | x]
    e_x0 = a * gain                                         # E_k[x0 | x]
    b_k = ad * e_x0 + bd * e_x1
    return jnp.einsum('bk,bkd->bd', post, b_k)

  def flow_map(self, interpolant: Interpolant, s, t, x, num_steps: int | None = None):
    """X_{s,t}(x) by RK4 on the closed-form velocity (error O(h^4); see tests for convergence)."""
    return samplers.integrate(lambda tt, xx: self.velocity(interpolant, tt, xx), x, s, t,
                              num_steps or self.ode_steps, 'rk4')


@dataclasses.dataclass(frozen=True)
class ExactFlowMap:
  """A target's exact flow map behind the FlowMap interface (params are ignored).

  Plugged in as "the network", it makes every rule's residual vanish (tests/test_rules.py);
  `perturbation` eps adds eps (t - s) sin(x + s + 2t) to X (keeping X_{s,s} = x), and the
  matching eps sin(x + 3t) to the velocity, so that the rules must become positive.
  """

  target: Any
  interpolant: Interpolant
  perturbation: float = 0.0

  def _bump(self, s, t, x):
    return self.perturbation * jnp.sin(x + expand(s, x) + 2 * expand(t, x))

  def X(self, params, s, t, x, labels=None):
    exact = self.target.flow_map(self.interpolant, s, t, x)
    return exact + expand(t - s, x) * self._bump(s, t, x)

  def v(self, params, s, t, x, labels=None):
    s = jnp.broadcast_to(jnp.asarray(s, jnp.float32), (x.shape[0],))
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
    if isinstance(self.target, GaussianTarget):
      # v = dd(mu) + dd(std) / std_s (x - mu_s), with divided differences accurate near s = t.
      mean = jnp.asarray(self.target.mean, jnp.float32)
      std_of = lambda u: self.target.marginal(self.interpolant, u[:, 0], x)[1]
      mu_s, std_s, _, _ = self.target.marginal(self.interpolant, s, x)
      s_b, t_b = expand(s, x), expand(t, x)
      dd_beta = flow_maps.divided_difference(self.interpolant.beta, s_b, t_b)
      dd_std = flow_maps.divided_difference(std_of, s_b, t_b)
      exact = dd_beta * mean + dd_std / std_s * (x - mu_s)
    else:
      near = jnp.abs(t - s) < 1e-3
      quotient = (self.target.flow_map(self.interpolant, s, t, x) - x) / expand(
          jnp.where(near, 1.0, t - s), x)
      midpoint = self.target.velocity(self.interpolant, 0.5 * (s + t), x)
      exact = jnp.where(expand(near, x), midpoint, quotient)
    return exact + self._bump(s, t, x)

  def velocity(self, params, t, x, labels=None):
    return self.target.velocity(self.interpolant, t, x) + self._bump(t, t, x)

  def teacher(self, t, x, labels=None):
    """The exact velocity as a teacher b(t, x, labels), unperturbed."""
    return self.target.velocity(self.interpolant, t, x)


def random_gmm(seed: int, num_components: int = 8, dim: int = 2, scale: float = 4.0,
               std: float = 0.3) -> GaussianMixtureTarget:
  """A seeded random layout: means uniform in [-scale, scale]^D, equal weights and stds."""
  rng = np.random.default_rng(seed)
  means = rng.uniform(-scale, scale, size=(num_components, dim))
  return GaussianMixtureTarget(means, np.full(num_components, std), np.ones(num_components))


@dataclasses.dataclass(frozen=True)
class CheckerboardTarget:
  """Uniform on the dark squares of a 4 x 4 checkerboard on [-4, 4]^2 (the usual 2-D test)."""

  squares: int = 4
  size: float = 4.0
  dim: int = 2

  def sample(self, key, n: int):
    key_cell, key_pos = jax.random.split(key)
    half = self.squares // 2
    # pick a row and a column of the right parity so (row + col) is even
    row = jax.random.randint(key_cell, (n,), 0, self.squares)
    col = 2 * jax.random.randint(jax.random.fold_in(key_cell, 1), (n,), 0, half) + (row % 2)
    cell = 2 * self.size / self.squares
    u = jax.random.uniform(key_pos, (n, 2))
    return jnp.stack([-self.size + (col + u[:, 0]) * cell, -self.size + (row + u[:, 1]) * cell], 1)


@dataclasses.dataclass(frozen=True)
class RingsTarget:
  """Concentric rings of radii 1..num_rings (scaled), with Gaussian radial noise."""

  num_rings: int = 3
  radius: float = 1.3
  noise: float = 0.08
  dim: int = 2

  def sample(self, key, n: int):
    k1, k2, k3 = jax.random.split(key, 3)
    ring = jax.random.randint(k1, (n,), 1, self.num_rings + 1).astype(jnp.float32)
    angle = jax.random.uniform(k2, (n,), maxval=2 * jnp.pi)
    r = ring * self.radius + self.noise * jax.random.normal(k3, (n,))
    return jnp.stack([r * jnp.cos(angle), r * jnp.sin(angle)], axis=1)


def make_target(name: str, **kwargs):
  """'gaussian' (mean, std), 'gmm' (means, stds, weights | seed, num_components, dim),
  'checkerboard', 'rings'."""
  if name == 'gaussian':
    return GaussianTarget(jnp.asarray(kwargs.pop('mean')), jnp.asarray(kwargs.pop('std')), **kwargs)
  if name == 'gmm':
    if kwargs.get('means') is None:
      for k in ('means', 'stds', 'weights'):
        kwargs.pop(k, None)
      return random_gmm(**kwargs)
    return GaussianMixtureTarget(**kwargs)
  if name == 'checkerboard':
    return CheckerboardTarget(**kwargs)
  if name == 'rings':
    return RingsTarget(**kwargs)
  raise ValueError(f"Unknown toy target {name!r}; choose 'gaussian', 'gmm', 'checkerboard' or 'rings'.")
