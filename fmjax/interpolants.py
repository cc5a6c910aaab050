"""Stochastic interpolants I_t = alpha_t x0 + beta_t x1 between noise and data.

One convention for all of fmjax (docs/notation.md): time runs from t = 0 (noise,
x0 ~ N(0, I)) to t = 1 (data, x1 ~ p_data), with alpha_0 = 1, beta_0 = 0, alpha_1 = 0,
beta_1 = 1 (Albergo, Boffi & Vanden-Eijnden, "Stochastic interpolants", arXiv 2303.08797).
The velocity the flow map integrates is b_t(x) = E[dI_t/dt | I_t = x].

Times are arrays of shape [batch] (or scalars); they broadcast against a batch of states
x of shape [batch, ...] through `expand`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

Schedule = Callable[[jax.Array], jax.Array]


def expand(t: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes times of shape [batch] (or a scalar) to broadcast against x [batch, ...]."""
  t = jnp.asarray(t, dtype=jnp.result_type(float))
  if t.ndim == 0:
    return t
  return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


@dataclasses.dataclass(frozen=True)
class Interpolant:
  """I_t = alpha(t) x0 + beta(t) x1 with x0 the Gaussian noise and x1 the data.

  `alpha_dot` and `beta_dot` default to derivatives by `jax.grad`, so a user-given
  pair of schedules needs only alpha and beta.
  """

  name: str
  alpha: Schedule
  beta: Schedule
  alpha_dot: Schedule | None = None
  beta_dot: Schedule | None = None

  def __post_init__(self):
    for field, base in (('alpha_dot', self.alpha), ('beta_dot', self.beta)):
      if getattr(self, field) is None:
        object.__setattr__(self, field, _elementwise_derivative(base))

  def coefficients(self, t):
    """(alpha_t, beta_t, alpha'_t, beta'_t) evaluated at t."""
    t = jnp.asarray(t, jnp.float32)
    return self.alpha(t), self.beta(t), self.alpha_dot(t), self.beta_dot(t)

  def sample(self, t, x0, x1):
    """I_t = alpha_t x0 + beta_t x1."""
    a, b = self.alpha(expand(t, x0)), self.beta(expand(t, x0))
    return a * x0 + b * x1

  def time_derivative(self, t, x0, x1):
    """dI_t/dt = alpha'_t x0 + beta'_t x1, the conditional velocity (flow-matching target)."""
    ad, bd = self.alpha_dot(expand(t, x0)), self.beta_dot(expand(t, x0))
    return ad * x0 + bd * x1

  def denoise(self, t, x, velocity):
    """E[x1 | I_t = x] from the velocity b_t(x) (both posterior means are linear in b).

    Solves x = alpha x0 + beta x1 and b = alpha' x0 + beta' x1 for x1.
    """
    a, b, ad, bd = (f(expand(t, x)) for f in (self.alpha, self.beta, self.alpha_dot, self.beta_dot))
    return (a * velocity - ad * x) / (a * bd - ad * b)

  def score(self, t, x, velocity):
    """grad_x log p_t(x), the score of the marginal of I_t, from the velocity b_t(x).

    With x0 ~ N(0, I) independent of x1, Tweedie's formula gives E[x0 | I_t = x] = -alpha_t score
    (Albergo, Boffi & Vanden-Eijnden, arXiv 2303.08797: the score is a posterior mean of the
    noise). Eliminating E[x1 | x] from x = alpha E[x0 | x] + beta E[x1 | x] and
    b = alpha' E[x0 | x] + beta' E[x1 | x]:
      score = (beta_t b - beta'_t x) / (alpha_t (alpha_t beta'_t - alpha'_t beta_t))
    (linear interpolant: (t b - x) / (1 - t)). Singular at alpha_t = 0 (t = 1, the data).
    """
    a, b, ad, bd = (f(expand(t, x)) for f in (self.alpha, self.beta, self.alpha_dot, self.beta_dot))
    return (b * velocity - bd * x) / (a * (a * bd - ad * b))

  def velocity_from_score(self, t, x, score):
    """b_t(x) from the score: the inverse of `score`,
      b = (beta'_t x + alpha_t (alpha_t beta'_t - alpha'_t beta_t) score) / beta_t.
    Singular at beta_t = 0 (t = 0, the noise). Its score coefficient is guidance's gain:
    a change of the score by grad log h changes the velocity by that coefficient times it."""
    a, b, ad, bd = (f(expand(t, x)) for f in (self.alpha, self.beta, self.alpha_dot, self.beta_dot))
    return (bd * x + a * (a * bd - ad * b) * score) / b


def _elementwise_derivative(f: Schedule) -> Schedule:
  scalar_grad = jax.grad(lambda t: jnp.sum(f(t)))
  return lambda t: scalar_grad(jnp.asarray(t, jnp.float32))


def linear() -> Interpolant:
  """Rectified flow / flow matching: alpha_t = 1 - t, beta_t = t."""
  return Interpolant(
      'linear',
      alpha=lambda t: 1.0 - t,
      beta=lambda t: t,
      alpha_dot=lambda t: -jnp.ones_like(t),
      beta_dot=lambda t: jnp.ones_like(t),
  )


def trigonometric() -> Interpolant:
  """Variance preserving: alpha_t = cos(pi t / 2), beta_t = sin(pi t / 2) (TrigFlow, Lu & Song 2024)."""
  h = jnp.pi / 2
  return Interpolant(
      'trigonometric',
      alpha=lambda t: jnp.cos(h * t),
      beta=lambda t: jnp.sin(h * t),
      alpha_dot=lambda t: -h * jnp.sin(h * t),
      beta_dot=lambda t: h * jnp.cos(h * t),
  )


def custom(alpha: Schedule, beta: Schedule, name: str = 'custom',
           alpha_dot: Schedule | None = None, beta_dot: Schedule | None = None) -> Interpolant:
  """Any user-given pair of schedules with alpha(0) = 1, beta(0) = 0, alpha(1) = 0, beta(1) = 1."""
  for value, expected, label in ((alpha(jnp.float32(0.0)), 1.0, 'alpha(0)'),
                                 (beta(jnp.float32(0.0)), 0.0, 'beta(0)'),
                                 (alpha(jnp.float32(1.0)), 0.0, 'alpha(1)'),
                                 (beta(jnp.float32(1.0)), 1.0, 'beta(1)')):
    if abs(float(value) - expected) > 1e-5:
      raise ValueError(f'{label} = {float(value)}, but fmjax needs {expected}: time runs from '
                       'noise at t = 0 to data at t = 1 (see docs/notation.md).')
  return Interpolant(name, alpha, beta, alpha_dot, beta_dot)


_REGISTRY = {'linear': linear, 'trigonometric': trigonometric}


def get(name: str) -> Interpolant:
  """Returns a named interpolant ('linear' or 'trigonometric')."""
  if name not in _REGISTRY:
    raise ValueError(f'Unknown interpolant {name!r}; choose one of {sorted(_REGISTRY)} '
                     'or build one with fmjax.interpolants.custom(alpha, beta).')
  return _REGISTRY[name]()
