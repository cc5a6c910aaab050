"""A tiny class-conditional toy run for the API and --mode=steer tests (imported by them).

Toy targets have no labels, so the run trains on the 2-D eight-mode mixture with a label per
point, its angle sector out of NUM_CLASSES (a function of x alone): a real class-conditional
network (label embedding with the extra null row used by classifier-free guidance), trained a
few steps through `fmjax.main.run` so that its workdir is what `fmjax.load` and --mode=steer
read. The tests pin plumbing, not quality; the label embedding is random-initialized and
trained a little, so every label (and the null one) gives a different velocity.
"""

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 3


def sector_labels(x):
  """The class of a 2-D point: its angle sector, NUM_CLASSES equal sectors from angle -pi."""
  angle = jnp.arctan2(x[:, 1], x[:, 0]) + math.pi
  return jnp.minimum((angle / (2 * math.pi / NUM_CLASSES)).astype(jnp.int32), NUM_CLASSES - 1)


def labelled_source(config, mesh):
  from fmjax.data import pipelines

  class LabelledToySource(pipelines.ToySource):
    def __init__(self, config, mesh):
      super().__init__(config, mesh)
      self.num_classes = NUM_CLASSES

    def batch(self, step):
      out = super().batch(step)
      return {**out, 'labels': sector_labels(out['x1'])}

  return LabelledToySource(config, mesh)


def toy_config(rule='flow_matching', steps=6):
  sys.path.insert(0, ROOT)
  from experiments import toy_gmm
  config = toy_gmm.get_config(rule)
  config.train.num_steps, config.train.batch_size, config.train.log_every = steps, 32, steps
  config.train.checkpoint_every = steps
  config.model_defaults.mlp.hidden, config.model_defaults.mlp.depth = 16, 2
  config.model_defaults.mlp.time_dim = 8
  config.eval.at_end = False
  config.optim.ema_decays = (0.75,)
  config.optim.warmup_steps = 0
  config.optim.learning_rate = 3e-2   # a few large steps: the labels move the velocity
  return config


def train_conditional(workdir, rule='flow_matching', steps=6):
  """Trains the labelled toy run into `workdir` (class-conditional, NUM_CLASSES classes)."""
  from fmjax import main
  from fmjax.data import pipelines
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(pipelines, 'make_source', labelled_source)
    main.run(toy_config(rule, steps), str(workdir), 'train')
  return workdir


def velocity_by_hand(model, s, t, x, labels):
  """The network's average velocity v_{s,t}(x | labels) with the loaded parameters, one
  un-jitted call (the displacement parameterization: X_{s,t}(x) = x + (t - s) net(s, t, x))."""
  n = x.shape[0]
  return np.asarray(model.parameterization.apply(
      model.params, jnp.full((n,), s, jnp.float32), jnp.full((n,), t, jnp.float32),
      jnp.asarray(x, jnp.float32), None if labels is None else jnp.asarray(labels, jnp.int32)),
      np.float64)


def noise_by_hand(key, rows, shape=(2,)):
  """Row i's noise: normal(fold_in(key, i)), the API's noise-by-row rule, written out."""
  return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, int(i)), shape, jnp.float32))
                   for i in rows])
