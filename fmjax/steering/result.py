"""What every steering sampler returns."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax


class SteerResult(NamedTuple):
  """samples [num, ...]; log_weights [num] (self-normalized importance log-weights of the final
  samples, None for methods without weights); ess: effective sample sizes as fractions of the
  particle count, None where not tracked (smc: [num_steps + 1], after each step and for the
  final weights; best_of_n: [1], the candidates' mean); nfe: network evaluations
  per returned sample (gradients of the look-ahead counted as one forward + one backward = 2)."""

  samples: jax.Array
  log_weights: Optional[jax.Array] = None
  ess: Optional[jax.Array] = None
  nfe: int = 0

  @property
  def weights(self) -> Optional[jax.Array]:
    """The importance weights exp(log_weights), normalized to sum to 1 over all returned samples
    (None for methods without weights). After SMC's final resampling they are uniform."""
    if self.log_weights is None:
      return None
    return jax.nn.softmax(self.log_weights)
