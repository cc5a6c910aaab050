"""What every steering sampler returns."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np


def reward_check(values, groups=None) -> jax.Array:
  """int32 [4] = (rows whose reward is NaN or +inf, rows, groups with no finite reward, groups)
  for rewards `values` [rows] (`groups`: the same values grouped [groups, size], or None).

  A reward may be -inf (the log of a zero probability: a hard constraint, weight zero), never
  NaN or +inf. The counts are computed inside jit (cheap) and turned into one clear error by
  `raise_on_bad_rewards` outside it."""
  bad = jnp.sum(jnp.isnan(values) | (values == jnp.inf))
  if groups is None:
    empty, num_groups = jnp.zeros((), jnp.int32), 0
  else:
    empty, num_groups = jnp.sum(jnp.all(~jnp.isfinite(groups), axis=-1)), groups.shape[0]
  return jnp.stack([bad.astype(jnp.int32), jnp.int32(values.shape[0]), empty.astype(jnp.int32),
                    jnp.int32(num_groups)])


def merge_checks(a, b) -> jax.Array:
  """Two reward_check counts of the same rows (e.g. two steps): the worse of each count."""
  return jnp.maximum(a, b)


def raise_on_bad_rewards(method: str, check) -> None:
  """One clear ValueError if `check` (a concrete reward_check) saw NaN / +inf rewards or a
  group without any finite reward; a no-op for None or a traced value (call it outside jit)."""
  if check is None:
    return
  try:
    bad, rows, empty, groups = (int(v) for v in np.asarray(check))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return                                   # inside jit: the caller checks the returned counts
  if bad:
    raise ValueError(f'{method}: the reward (or its gradient) was NaN or +inf for {bad} of {rows} '
                     'rows. A reward must be finite, or -inf where a sample is forbidden (a hard '
                     'constraint); replace NaN by -inf or by a finite penalty.')
  if empty:
    raise ValueError(f'{method}: {empty} of {groups} groups have no sample with a finite reward '
                     '(every candidate violates the hard constraint, reward -inf), so nothing can '
                     'be drawn from them. Use more particles/candidates per group or a softer '
                     'constraint (a finite penalty).')


class SteerResult(NamedTuple):
  """samples [num, ...]; log_weights [num] (self-normalized importance log-weights of the final
  samples, None for methods without weights); ess: effective sample sizes as fractions of the
  particle count, None where not tracked (smc: [num_steps + 1], after each step and for the
  final weights; best_of_n: [1], the candidates' mean); nfe: network evaluations
  per returned sample (gradients of the look-ahead counted as one forward + one backward = 2);
  labels: the class labels of the returned rows where resampling may move rows (smc: each
  row's ancestor's label), None otherwise; reward_check: `reward_check` counts of the rewards
  the method evaluated (None where none): the functions raise on them when called outside jit,
  a jitted caller calls `check(method)` on the result."""

  samples: jax.Array
  log_weights: Optional[jax.Array] = None
  ess: Optional[jax.Array] = None
  nfe: int = 0
  labels: Optional[jax.Array] = None
  reward_check: Optional[jax.Array] = None

  def check(self, method: str) -> 'SteerResult':
    """Raises one clear ValueError for NaN / +inf rewards or groups left without a finite
    reward (see raise_on_bad_rewards); returns self."""
    raise_on_bad_rewards(method, self.reward_check)
    return self

  @property
  def weights(self) -> Optional[jax.Array]:
    """The importance weights exp(log_weights), normalized to sum to 1 over all returned samples
    (None for methods without weights). After SMC's final resampling they are uniform."""
    if self.log_weights is None:
      return None
    return jax.nn.softmax(self.log_weights)


def check_positive(name: str, value) -> None:
  """One message for a temperature, scale or step that must be a positive finite number."""
  if isinstance(value, bool) or not float(value) > 0 or not np.isfinite(float(value)):
    raise ValueError(f'{name} must be a positive number, got {value!r}.')
