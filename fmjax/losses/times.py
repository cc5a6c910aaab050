"""Time samplers for training rules: single times, ordered pairs s <= t, and dyadic steps.

All times are in fmjax's convention (0 noise, 1 data). Papers written in the opposite
direction translate their parameters once, here or in their config: MeanFlow's
logit-normal(-0.4, 1) on its t (1 = noise) is logit-normal(+0.4, 1) in fmjax time, since
logit(1 - u) = -logit(u).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TimeDistribution:
  """A distribution on [0, 1]: 'uniform' or 'logit_normal' (Esser et al. 2024, Eq. 19).

  Samples are clipped to [eps, 1 - eps]; some parameterizations divide by alpha_s, which
  vanishes at the data end.
  """

  name: str = 'uniform'
  mean: float = 0.0
  std: float = 1.0
  eps: float = 1e-5

  def __post_init__(self):
    if self.name not in ('uniform', 'logit_normal'):
      raise ValueError(f"Unknown time distribution {self.name!r}; choose 'uniform' or 'logit_normal'.")

  def sample(self, key, n: int) -> jax.Array:
    if self.name == 'uniform':
      u = jax.random.uniform(key, (n,))
    else:
      u = jax.nn.sigmoid(self.mean + self.std * jax.random.normal(key, (n,)))
    return jnp.clip(u, self.eps, 1.0 - self.eps)


def sample_pairs(key, n: int, distribution: TimeDistribution) -> tuple[jax.Array, jax.Array]:
  """n ordered pairs s <= t: two independent draws, sorted (MeanFlow, Alg. 1; Boffi et al. 2505.18825)."""
  a, b = jnp.split(distribution.sample(key, 2 * n), 2)
  return jnp.minimum(a, b), jnp.maximum(a, b)


def sample_dyadic_steps(key, n: int, num_levels: int) -> tuple[jax.Array, jax.Array]:
  """Shortcut models' steps (Frans et al. 2410.12557, Sec. 3): a jump of h = 2^-k, k < num_levels,
  from a start s on the grid of multiples of h with s + h <= 1. Returns (s, t = s + h)."""
  key_level, key_start = jax.random.split(key)
  level = jax.random.randint(key_level, (n,), 0, num_levels)
  h = 2.0 ** (-level.astype(jnp.float32))
  cells = 2 ** level   # number of grid points j h with j h + h <= 1
  j = jnp.floor(jax.random.uniform(key_start, (n,)) * cells)
  s = j * h
  return s, s + h
