r"""n-D Gaussian mixture with a random layout (config.data.seed), for any rule.

The high-dimensional mixture of Boffi, Albergo & Vanden-Eijnden, "How to build a consistency
model: learning flow maps via self-distillation" (arXiv 2505.18825, Sec. 5.1): K random
means, closed-form velocity, few-step quality by energy distance and sliced Wasserstein.

Run:
  python -m fmjax.main --config=experiments/toy_gmm_nd.py --workdir=runs/gmm_nd
  python -m fmjax.main --config=experiments/toy_gmm_nd.py:esd,32 --workdir=runs/gmm32_esd

ARG = RULE[,DIM] (default lsd, 16). Same public fields as experiments/toy_gmm.py.
"""

import os
import sys

from fmjax import configs

sys.path.append(os.path.dirname(os.path.abspath(__file__)))   # toy_common.py beside this file
import toy_common  # pylint: disable=wrong-import-position


def get_config(arg=None):
  rule, dim = toy_common.rule_and_dim(arg, default_dim=16)
  c = configs.base_config()
  c.data.name = 'gmm'
  c.data.dim = dim
  c.data.num_components = 8
  c.data.seed = 0            # random means from this seed (config.data.means stays None)
  toy_common.set_toy_rule(c, rule)
  c.train.num_steps = 5000
  c.train.batch_size = 512
  c.train.log_every = 250
  c.train.checkpoint_every = 1000
  c.optim.warmup_steps = 200
  c.optim.schedule = 'cosine'
  c.model_defaults.mlp.hidden = 512
  c.model_defaults.mlp.depth = 4
  return c
