r"""MNIST (the 5,000 offline digits, mnist5k) with flow matching, LSD or MeanFlow.

A small class-conditional image experiment that runs on one CPU or GPU: flow matching
(Lipman et al. 2023, the diagonal alone), Lagrangian self-distillation (Boffi, Albergo &
Vanden-Eijnden, arXiv 2505.18825, Eq. 3.4) or MeanFlow (Geng et al. 2025, arXiv
2505.13447, Eq. 10), with the MNIST setting of 2505.18825 (Sec. 5.2). Uses the U-Net of
fmjax.models when available (config.model.name = 'unet'), else `:RULE,mlp` for the MLP on
flattened pixels.

Prepare (offline, once):
  python -m fmjax.data.mnist5k --data_dir=~/tensorflow_datasets
Run:
  python -m fmjax.main --config=experiments/mnist.py:lsd --workdir=runs/mnist_lsd
  python -m fmjax.main --config=experiments/mnist.py:meanflow --workdir=runs/mnist_mf
  python -m fmjax.main --config=experiments/mnist.py:flow_matching,mlp --workdir=runs/mnist_fm_mlp

ARG = RULE[,MODEL] with RULE in flow_matching | lsd | meanflow, MODEL in unet | mlp.
"""

from fmjax import configs


def get_config(arg=None):
  rule, model = 'lsd', 'unet'
  if arg:
    parts = arg.split(',')
    rule = parts[0] or rule
    model = parts[1] if len(parts) > 1 else model
  c = configs.base_config()
  c.data.name = 'mnist5k'
  c.data.num_classes = 10
  c.data.split = 'train'
  c.loss.name = rule
  if rule == 'meanflow':
    c.flow_map.parameterization = 'meanflow'
    c.model.time_conditioning = 't_gap'
    c.loss.label_dropout = 0.1
  c.model.name = model
  if model == 'mlp':
    c.model.hidden = 1024
    c.model.depth = 4
  else:
    c.model.kwargs.channels = 64
    c.model.kwargs.channel_mults = (1, 2, 2)
    c.model.kwargs.num_res_blocks = 2
    c.model.kwargs.attention_resolutions = (7,)
  c.train.num_steps = 20_000
  c.train.batch_size = 128
  c.train.log_every = 200
  c.train.eval_every = 5000
  c.train.checkpoint_every = 2000
  c.optim.learning_rate = 2e-4
  c.optim.warmup_steps = 500
  c.optim.ema_decays = (0.999, 0.9999)
  c.eval.steps = (1, 2, 4)
  c.eval.grid_size = 10
  return c
