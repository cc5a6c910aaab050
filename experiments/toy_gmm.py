r"""Toy Gaussian mixture: any rule on a K-component mixture in D dimensions.

Follows the 2-D mixture experiments of Boffi, Albergo & Vanden-Eijnden, "How to build a
consistency model: learning flow maps via self-distillation" (arXiv 2505.18825, Sec. 5.1
and Table 1), where the Lagrangian (LSD), Eulerian (ESD) and semigroup (PSD) rules are
compared by few-step sample quality.

Run:
  python -m fmjax.main --config=experiments/toy_gmm.py --workdir=runs/toy_gmm
  python -m fmjax.main --config=experiments/toy_gmm.py:meanflow --workdir=runs/toy_gmm_mf
  python -m fmjax.main --config=experiments/toy_gmm.py:lsd,16 --workdir=runs/gmm16d   (16-D, random layout)

ARG = RULE[,DIM]. The target is read from the config (a public interface):
  config.data.name = 'gmm'; config.data.means (K x D), config.data.stds (K),
  config.data.weights (K); config.data.seed draws a random layout when means is None.
  config.interpolant, config.loss.name, config.train.num_steps, config.train.batch_size.
"""

import os
import sys

from fmjax import configs

sys.path.append(os.path.dirname(os.path.abspath(__file__)))   # toy_common.py beside this file
import toy_common  # pylint: disable=wrong-import-position


def get_config(arg=None):
  rule, dim = toy_common.rule_and_dim(arg, default_dim=2)
  c = configs.base_config()
  c.data.name = 'gmm'
  c.data.dim = dim
  if dim == 2:
    # Eight modes on a circle of radius 4, the usual 2-D benchmark layout.
    import math
    c.data.means = tuple((4 * math.cos(2 * math.pi * k / 8), 4 * math.sin(2 * math.pi * k / 8))
                         for k in range(8))
    c.data.stds = (0.4,) * 8
    c.data.weights = (1.0,) * 8
  c.interpolant = 'linear'
  toy_common.set_toy_rule(c, rule)
  c.train.num_steps = 3000
  c.train.batch_size = 512
  c.train.log_every = 250
  c.train.checkpoint_every = 1000
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 200
  c.optim.schedule = 'cosine'
  c.optim.ema_decays = (0.999,)
  c.model_defaults.mlp.hidden = 256
  c.model_defaults.mlp.depth = 4
  return c
