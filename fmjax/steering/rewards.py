"""Rewards r(x, labels) -> [batch]: pure, jittable, differentiable in x where they can be.

A reward is any callable `r(x, labels)` returning one float per row of x (labels may be None and
may be ignored). Built in here: the quadratic reward (the Gaussian log-density up to a constant),
whose tilt of a Gaussian mixture is again a Gaussian mixture (`fmjax.steering.tilted`), and the
one-sided quadratic of arXiv 2511.22688's 8-Gaussian ring experiment. A classifier's log p(y | x)
lives in `fmjax.steering.classifier`. A config names its reward from NAMES ('quadratic',
'one_sided', 'classifier'); `from_config(config.steer)` and `from_config(config.finetune)` build it,
the one factory of --mode=steer and reward fine-tuning. Any user function works, e.g.

  def brightness(x, labels=None):          # reward bright images
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))
  model.steer(key, 64, brightness, method='smc', temperature=0.1, steps=8)
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

Reward = Callable[[jax.Array, Optional[jax.Array]], jax.Array]


def _flat(x):
  return x.reshape(x.shape[0], -1)


def quadratic(center, std: float) -> Reward:
  """r(x) = -|x - c|^2 / (2 std^2), summed over every non-batch dimension.

  center: a scalar or an array broadcastable to one example (e.g. [D]).
  """
  if not float(std) > 0:
    raise ValueError(f'the quadratic reward needs std > 0, got {std!r}.')
  center = jnp.asarray(center, jnp.float32)

  def reward(x, labels=None):
    del labels
    return -0.5 * jnp.sum(_flat(x - center) ** 2, axis=-1) / std**2
  return reward


def gaussian_log_density(mean, std: float) -> Reward:
  """r(x) = log N(x; mean, std^2 I): the quadratic reward plus its normalizing constant (the tilt
  is the same; rewards reported as log-densities are comparable across dimensions)."""
  base = quadratic(mean, std)

  def reward(x, labels=None):
    d = _flat(x).shape[-1]
    return base(x, labels) - 0.5 * d * jnp.log(2 * jnp.pi * std**2)
  return reward


def one_sided_quadratic(axis: int = 0) -> Reward:
  """r(x) = -x_a^2 1[x_a < 0]: the 8-Gaussian ring reward of arXiv 2511.22688 (Sec. on toy
  experiments, not checked beyond this formula), pushing mass to x_a > 0."""

  def reward(x, labels=None):
    del labels
    xa = _flat(x)[:, axis]
    return -jnp.where(xa < 0, xa**2, 0.0)
  return reward


def check_reward(reward: Reward, x, labels=None) -> None:
  """One clear error if `reward` does not map a batch [n, ...] to n finite floats (traced once,
  with shapes only, before any sampling)."""
  out = jax.eval_shape(reward, x, labels)
  if out.shape != (x.shape[0],):
    raise ValueError(f'a reward must return one value per row, shape ({x.shape[0]},); this one '
                     f'returns {out.shape} for x of shape {x.shape}. Sum or average over the other axes.')
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise ValueError(f'a reward must return floats, got {out.dtype}.')


# The rewards a config names (config.steer.reward for --mode=steer, config.finetune.reward for
# reward fine-tuning): one list and one factory, `from_config`, for both.
NAMES = ('quadratic', 'one_sided', 'classifier')
# The fields of a config block each reward reads (besides `reward`, its name).
FIELDS = {'quadratic': ('center', 'std'), 'one_sided': (), 'classifier': ('classifier_dir', 'target_class')}


def from_config(block) -> Reward:
  """The reward a config block names: block.reward in NAMES with its fields (FIELDS):
  'quadratic' -> quadratic(block.center, block.std); 'one_sided' -> one_sided_quadratic() (axis
  0); 'classifier' -> log p(block.target_class | x) of the classifier trained into
  block.classifier_dir (fmjax.steering.classifier; its folder is read here, so a missing one
  fails before any model is loaded). `block` is config.steer or config.finetune."""
  name = block.reward
  if name == 'quadratic':
    return quadratic(np.asarray(block.center, np.float32), float(block.std))
  if name == 'one_sided':
    return one_sided_quadratic()
  if name == 'classifier':
    if not block.get('classifier_dir'):
      raise ValueError("reward = 'classifier' needs classifier_dir, a trained classifier's folder "
                       '(python -m fmjax.steering.train_classifier --workdir=DIR).')
    from fmjax.steering import classifier   # pylint: disable=import-outside-toplevel
    return classifier.load_reward(block.classifier_dir, int(block.target_class))
  raise ValueError(f'unknown reward {name!r}; choose one of {NAMES}.')


def describe(block) -> dict:
  """{'reward': name, field: value, ...}: the reward's options in force (for metrics files)."""
  out = {'reward': block.reward}
  for field in FIELDS.get(block.reward, ()):
    value = block.get(field)
    out[field] = np.asarray(value).tolist() if field == 'center' else value
  return out
