"""Sample-based distances between a model's samples and a toy target, in jnp.

energy_distance: E|X - Y| - (E|X - X'| + E|Y - Y'|) / 2 with the U-statistics (diagonals
  excluded) for the within-set terms (Szekely & Rizzo 2013, Eq. 2 up to the factor 2 of
  their definition); zero iff the two laws agree, O(1/n) bias-free under equal laws.
sliced_wasserstein: the 1-Wasserstein distance of 1-D projections on random unit
  directions, averaged (Bonneel et al. 2015); W1 in 1-D is the mean gap of sorted samples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _pairwise_mean_distance(a, b, exclude_diagonal: bool):
  d = jnp.sqrt(jnp.maximum(jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, -1), 1e-30))
  if exclude_diagonal:
    n = a.shape[0]
    return (jnp.sum(d) - jnp.sum(jnp.diag(d))) / (n * (n - 1))
  return jnp.mean(d)


@jax.jit
def energy_distance(x: jax.Array, y: jax.Array) -> jax.Array:
  """Energy distance between samples x [n, d] and y [m, d] (>= 0 in expectation)."""
  x = x.reshape(x.shape[0], -1).astype(jnp.float32)
  y = y.reshape(y.shape[0], -1).astype(jnp.float32)
  return (_pairwise_mean_distance(x, y, False)
          - 0.5 * _pairwise_mean_distance(x, x, True) - 0.5 * _pairwise_mean_distance(y, y, True))


def sliced_wasserstein(x: jax.Array, y: jax.Array, key=None, num_projections: int = 128) -> jax.Array:
  """Mean W1 over random 1-D projections; x and y must hold the same number of samples."""
  if x.shape[0] != y.shape[0]:
    raise ValueError(f'sliced_wasserstein needs equal sample counts, got {x.shape[0]} and {y.shape[0]}.')
  key = jax.random.PRNGKey(0) if key is None else key
  return _sliced_wasserstein(x.reshape(x.shape[0], -1).astype(jnp.float32),
                             y.reshape(y.shape[0], -1).astype(jnp.float32), key, num_projections)


def _sliced_wasserstein_impl(x, y, key, num_projections):
  directions = jax.random.normal(key, (x.shape[1], num_projections))
  directions = directions / jnp.linalg.norm(directions, axis=0, keepdims=True)
  px, py = jnp.sort(x @ directions, axis=0), jnp.sort(y @ directions, axis=0)
  return jnp.mean(jnp.abs(px - py))


_sliced_wasserstein = jax.jit(_sliced_wasserstein_impl, static_argnums=3)
