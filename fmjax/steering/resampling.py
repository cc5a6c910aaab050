"""Importance-weight bookkeeping shared by SMC and reward fine-tuning: systematic resampling and
the effective sample size, on (unnormalized) log-weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def systematic_resample(key, log_weights: jax.Array, num: int | None = None) -> jax.Array:
  """`num` (default n) indices drawn by systematic resampling from log-weights [n].

  One uniform u ~ U[0, 1/num); index i is taken once for every point (j + u) / num falling in
  its cumulative-weight interval, so its count is floor(num w_i) or ceil(num w_i) and
  E[count] = num w_i (Kitagawa 1996; Douc, Cappe & Moulines 2005).
  """
  n = log_weights.shape[0]
  num = n if num is None else num
  cdf = jnp.cumsum(jax.nn.softmax(log_weights))
  cdf = cdf.at[-1].set(1.0)                                 # guard the float round-off at the end
  points = (jax.random.uniform(key) + jnp.arange(num)) / num
  return jnp.minimum(jnp.searchsorted(cdf, points, side='right', method='compare_all'), n - 1)


def ess_fraction(log_weights: jax.Array) -> jax.Array:
  """(sum w)^2 / (n sum w^2) along the last axis: 1 for equal weights, 1/n for one survivor."""
  log_w = log_weights - jax.scipy.special.logsumexp(log_weights, axis=-1, keepdims=True)
  return jnp.exp(-jax.scipy.special.logsumexp(2 * log_w, axis=-1)) / log_weights.shape[-1]
