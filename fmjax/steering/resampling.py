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
  Zero weights (log-weight -inf, a hard constraint) are never drawn: their cumulative-weight
  interval is empty, and a point past the end of the float cdf (round-off) goes to the last
  index of positive weight, not to index n - 1.
  """
  n = log_weights.shape[0]
  num = n if num is None else num
  w = jax.nn.softmax(log_weights)
  cdf = jnp.cumsum(w)
  cdf = cdf / cdf[-1]                                       # guard the float round-off at the end
  last = n - 1 - jnp.argmax(w[::-1] > 0)                    # the last index of positive weight
  points = (jax.random.uniform(key) + jnp.arange(num)) / num
  return jnp.minimum(jnp.searchsorted(cdf, points, side='right', method='compare_all'), last)


def ess_fraction(log_weights: jax.Array) -> jax.Array:
  """(sum w)^2 / (n sum w^2) along the last axis: 1 for equal weights, 1/n for one survivor."""
  log_w = log_weights - jax.scipy.special.logsumexp(log_weights, axis=-1, keepdims=True)
  return jnp.exp(-jax.scipy.special.logsumexp(2 * log_w, axis=-1)) / log_weights.shape[-1]
