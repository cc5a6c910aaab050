r"""MNIST (the 5,000 offline digits, mnist5k) with flow matching, LSD or MeanFlow.

A small class-conditional image experiment that runs on one CPU or GPU: flow matching
(Lipman et al. 2023, the diagonal alone), Lagrangian self-distillation (Boffi, Albergo &
Vanden-Eijnden, arXiv 2505.18825, Sec. 3) or MeanFlow (Geng et al. 2025, arXiv
2505.13447, Eq. 10), with the MNIST setting of 2505.18825 (Sec. 5.2). Uses the U-Net of
fmjax.models (config.model.name = 'unet', the default) or, with `:RULE,mlp`, the MLP on
flattened pixels.

Prepare (offline, once):
  python -m fmjax.data.mnist5k --data_dir=~/tensorflow_datasets
Run:
  python -m fmjax.main --config=experiments/mnist.py:lsd --workdir=runs/mnist_lsd
  python -m fmjax.main --config=experiments/mnist.py:meanflow --workdir=runs/mnist_mf
  python -m fmjax.main --config=experiments/mnist.py:flow_matching,mlp --workdir=runs/mnist_fm_mlp

ARG = RULE[,MODEL] with RULE in flow_matching | lsd | meanflow, MODEL in unet | mlp.

CPU recipe (`:lsd,mlp`, docs/results.md): 4,000 updates of a 512-wide MLP with the
x-prediction map (~15 min on 2 shared cores), then the few-step FID sweep:
  python -m fmjax.evaluation.prepare_inception
  python -m fmjax.evaluation.reference_stats --dataset mnist5k --split train \
      --data_dir ~/tensorflow_datasets --num_samples 1000 --out runs/fid_stats/mnist5k_train_1000.npz
  python -m fmjax.main --config=experiments/mnist.py:lsd,mlp --workdir=runs/mnist_lsd_mlp \
      --config.data.data_dir=$HOME/tensorflow_datasets \
      --config.eval.fid_reference=runs/fid_stats/mnist5k_train_1000.npz
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
  c.loss_defaults.meanflow = {'label_dropout': 0.1}
  if rule == 'meanflow':
    c.flow_map.parameterization = 'meanflow'
    c.model.time_conditioning = 't_gap'
  c.model.name = model
  if model == 'mlp':
    # The CPU recipe of docs/results.md: a 512-wide MLP on flattened pixels, 5,000 updates,
    # about 20 minutes on 2 shared CPU cores.
    c.model_defaults.mlp.hidden = 512
    c.model_defaults.mlp.depth = 3
    if rule != 'meanflow':
      # A 512-wide MLP cannot pass 784 noise pixels through to cancel them, so the
      # displacement map x + (t - s) v leaves speckle noise in every sample; the
      # x-prediction map (EDM preconditioning) outputs the denoised image at t = 1 instead.
      c.flow_map.parameterization = 'x_prediction'
  else:
    c.model_defaults.unet = {'model_channels': 64, 'channel_mult': (1, 2, 2), 'num_res_blocks': 2,
                             'attn_resolutions': (7,)}
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
  if model == 'mlp':
    c.train.num_steps = 4000
    c.train.eval_every = 0
    c.train.checkpoint_every = 1000
    c.optim.learning_rate = 5e-4
    c.optim.schedule = 'cosine'
    c.optim.warmup_steps = 200
    c.optim.ema_decays = (0.999,)
    # FID on a CPU: the 299x299 Inception network runs at ~1-2 images/s on 2 shared cores, so
    # this recipe scores 300 samples per sampler against 1,000 training images (biased far
    # above any 50k-sample FID; for ranking samplers of this model only). On a GPU use
    # --config.eval.fid_num_samples=50000 and the full-split reference.
    c.eval.fid_num_samples = 300
    c.eval.fid_batch_size = 50
    c.eval.fid_reference_samples = 1000
    c.eval.ode_nfe = (1, 2, 4, 8, 16)
  return c
