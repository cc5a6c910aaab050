"""Best-of-N toward q(x) ∝ p(x) exp(r(x) / lambda), the honest baseline of steering.

Draw n base samples per output and keep the best (argmax) or resample one by the weights
exp(r / lambda) (sampling-importance-resampling; as n -> inf its law tends to q).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax.steering.methods import BestOfNOptions   # the options and their checks
from fmjax.steering.result import SteerResult, raise_on_bad_rewards, reward_check


def best_of_n(key, sample_fn, reward, num: int, n: int, *, temperature: float,
              select: str = 'argmax', labels=None, base_nfe: int = 1) -> SteerResult:
  """num samples, each chosen among n base samples by the reward.

  sample_fn(key, count, labels) -> [count, ...] clean samples (labels repeated n times per row).
  select='argmax': the best of n (not a sample of q; the usual baseline);
  select='importance': one of the n drawn with probability ∝ exp(r / temperature)
    (sampling-importance-resampling: tends to q as n grows). ess: the mean over outputs of the
    n candidates' effective sample size as a fraction of n.
  nfe = n * base_nfe (base_nfe: the base sampler's evaluations per sample).
  A reward of -inf is a hard constraint: such a candidate is never picked (weight zero; argmax
  too), and an output whose n candidates are all -inf is an error, as is a NaN or +inf reward
  (raised here when called outside jit; under jit call `.check('best_of_n')` on the result).
  """
  if int(n) < 1 or int(num) < 1:
    raise ValueError(f'num and n must be >= 1, got num={num}, n={n}.')
  BestOfNOptions(temperature=temperature, num_particles=int(n), select=select)   # one ValueError on a bad option
  key_sample, key_pick = jax.random.split(key)
  many_labels = None if labels is None else jnp.repeat(jnp.asarray(labels), n, axis=0)
  x = sample_fn(key_sample, num * n, many_labels)
  r = reward(x, many_labels).reshape(num, n)
  checked = reward_check(r.reshape(-1), r)
  x = x.reshape((num, n) + x.shape[1:])
  logits = r / temperature
  if select == 'argmax':
    pick = jnp.argmax(r, axis=1)
  else:
    pick = jax.random.categorical(key_pick, logits, axis=1)
  w = jax.nn.softmax(logits, axis=1)
  ess = jnp.mean(1.0 / jnp.sum(w**2, axis=1)) / n
  raise_on_bad_rewards('best_of_n', checked)
  return SteerResult(x[jnp.arange(num), pick], None, ess[None], int(n) * int(base_nfe),
                     reward_check=checked)
