r"""2-D checkerboard: the `make demo` experiment (a few minutes on two CPU cores).

A flow map trained from scratch by self-distillation (LSD: Boffi, Albergo &
Vanden-Eijnden, arXiv 2505.18825, Sec. 3, with the diagonal flow-matching term) or by
MeanFlow (Geng et al. 2025, arXiv 2505.13447, Eq. 10); the few-step table (energy distance
and sliced Wasserstein for 1, 2, 4, 8 steps against a fresh target draw) and a PNG of the
samples are written to the workdir, as in the 2-D figures of 2505.18825 (Sec. 5.1).

Run:
  python -m fmjax.main --config=experiments/toy_checkerboard.py --workdir=runs/demo
  python -m fmjax.main --config=experiments/toy_checkerboard.py:meanflow --workdir=runs/demo_mf

ARG = RULE (default lsd).
"""

import os
import sys

from fmjax import configs

sys.path.append(os.path.dirname(os.path.abspath(__file__)))   # toy_common.py beside this file
import toy_common  # pylint: disable=wrong-import-position


def get_config(arg=None):
  c = configs.base_config()
  c.data.name = 'checkerboard'
  c.data.dim = 2
  c.data.scale = 1.0
  toy_common.set_toy_rule(c, arg or 'lsd')
  c.train.num_steps = 3000
  c.train.batch_size = 512
  c.train.log_every = 500
  c.train.checkpoint_every = 1500
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 200
  c.optim.schedule = 'cosine'
  c.optim.ema_decays = (0.99,)
  c.model_defaults.mlp.hidden = 256
  c.model_defaults.mlp.depth = 4
  c.eval.num_samples = 2000
  return c
