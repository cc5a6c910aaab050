r"""Toy Gaussian target N(0, scale^2 I) in D dimensions: the exact-map sanity check.

Every interpolant gives Gaussian marginals and an affine exact flow map
X_{s,t}(x) = (std_t / std_s) x (fmjax/data/toy.py), so a rule that trains correctly
reaches the two-draw floor of the few-step table with any number of steps. Follows the
Gaussian checks of Boffi, Albergo & Vanden-Eijnden, "Flow map matching" (arXiv 2406.07507,
Sec. 4.1).

Run:
  python -m fmjax.main --config=experiments/toy_gaussian.py --workdir=runs/toy_gaussian
  python -m fmjax.main --config=experiments/toy_gaussian.py:meanflow,8 --workdir=runs/gauss8

ARG = RULE[,DIM] with RULE any fmjax.losses name (default lsd), DIM default 2.
"""

import os
import sys

from fmjax import configs

sys.path.append(os.path.dirname(os.path.abspath(__file__)))   # toy_common.py beside this file
import toy_common  # pylint: disable=wrong-import-position


def get_config(arg=None):
  rule, dim = toy_common.rule_and_dim(arg, default_dim=2)
  c = configs.base_config()
  c.data.name = 'gaussian'
  c.data.dim = dim
  c.data.scale = 2.0
  toy_common.set_toy_rule(c, rule)
  c.train.num_steps = 1000
  c.train.batch_size = 256
  c.train.log_every = 100
  c.train.checkpoint_every = 500
  c.optim.warmup_steps = 100
  c.model_defaults.mlp.hidden = 128
  c.model_defaults.mlp.depth = 3
  return c
