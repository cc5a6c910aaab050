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

ARG = RULE[,MODEL[,SIZE]] with RULE in flow_matching | lsd | meanflow, MODEL in unet | mlp, SIZE
in default | h100 | cpu | tiny.

`h100` (U-Net only): the GPU presets of benchmarks/gpu_mnist_fid.sh, sized to train in about 4
minutes each on one H100 (an *estimate*, not measured: see `H100_STEPS`), evaluated with 5,000
samples per sampler against all 5,000 mnist5k digits: LSD and MeanFlow as flow maps at 1, 2
and 4 steps, flow matching (the baseline) by its Euler ODE at 8, 16, 32 and 64 NFE. `tiny`: the
same evaluation plan at a size that runs in seconds on a CPU (the script's TINY=1 path).
`cpu` (U-Net only): a 32-channel U-Net (one residual block per level, no attention), 2,000
updates of batch 64 (measured alone on 2 CPU cores: 32 min for LSD, 26 min for flow matching),
scored like h100 with 5,000 samples against all 5,000 digits, the baseline's ODE at 8, 16 and
32 NFE:
  SIZE=cpu RULES="lsd flow_matching" OUT=runs/cpu_mnist bash benchmarks/gpu_mnist_fid.sh

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

# Updates of the h100 presets, the same for every rule (samplers compared at equal training).
# Time estimate (not measured): the U-Net below costs 2.38 GFLOP per 28x28 forward (XLA:CPU
# cost analysis, batch 8), a flow-matching step ~3x that per image (forward + backward), so
# 0.91 TFLOP per batch of 128; LSD and MeanFlow cost ~1.5x and ~1.2x (the paper-mix FLOP
# ratios of docs/bench/loss_cost_dit_h100.md, measured on a DiT, not this U-Net). At an
# assumed 40 TFLOP/s sustained on an H100 (TF32 convs; between the launch-bound 7 TFLOP/s of
# the 2.8 ms DiT step in docs/bench and ~10 % of the dense TF32 peak), 5,000 steps take
# ~115 s (flow matching), ~140 s (MeanFlow), ~170 s (LSD), plus compilation and evaluation:
# about 4 minutes per rule.
H100_STEPS = 5000
SIZES = ('default', 'h100', 'cpu', 'tiny')
# The cpu preset: a 32-channel U-Net that trains in ~30 min on 2 CPU cores (0.85 s per LSD
# step of batch 64 measured here, jax 0.10.2), scored like h100 with 5,000 samples.
CPU_STEPS = 2000


def get_config(arg=None):
  rule, model, size = 'lsd', 'unet', 'default'
  if arg:
    parts = arg.split(',')
    rule = parts[0] or rule
    model = parts[1] if len(parts) > 1 and parts[1] else model
    size = parts[2] if len(parts) > 2 else size
  if size not in SIZES:
    raise ValueError(f'experiments/mnist.py: size {size!r} is not one of {SIZES} '
                     '(ARG = RULE[,MODEL[,SIZE]], e.g. lsd,unet,h100)')
  if size != 'default' and model != 'unet':
    raise ValueError(f'experiments/mnist.py: the {size} presets are U-Net presets; use '
                     f'{rule},unet,{size}')
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
  if size != 'default':
    _gpu_preset(c, rule, tiny=size == 'tiny', cpu=size == 'cpu')
  return c


def _gpu_preset(c, rule, tiny, cpu=False):
  """The h100 (or cpu, or tiny) preset: training length, and the evaluation plan of the few-step table."""
  c.train.batch_size = 8 if tiny else 64 if cpu else 128
  c.train.num_steps = 3 if tiny else CPU_STEPS if cpu else H100_STEPS
  c.train.log_every = 1 if tiny else 500
  c.train.eval_every = 0
  c.train.checkpoint_every = c.train.num_steps
  c.optim.learning_rate = 4e-4   # short run: a larger step than the 20k-step default's 2e-4
  c.optim.schedule = 'cosine'
  c.optim.warmup_steps = 1 if tiny else 250
  # One EMA: 0.999 averages the last ~1,000 of 5,000 steps (0.9999 would still hold the
  # early, poor iterates).
  c.optim.ema_decays = (0.999,)
  if tiny or cpu:
    c.model_defaults.unet = {'model_channels': 32, 'channel_mult': (1, 2), 'num_res_blocks': 1,
                             'attn_resolutions': ()}
  c.eval.fid_num_samples = 4 if tiny else 5000
  # 100 per batch on a CPU: the 299x299 Inception activations of 500 images take ~10 GiB.
  c.eval.fid_batch_size = 4 if tiny else 100 if cpu else 500
  c.eval.grid_size = 2 if tiny else 10
  if rule == 'flow_matching':
    # The baseline: only its velocity is trained, so only the ODE is scored.
    c.eval.steps = ()
    c.eval.ode_method = 'euler'
    # cpu: 8, 16 and 32 NFE, the latent chain's rows (each 5,000-sample FID costs ~9 min of
    # Inception on 2 cores).
    c.eval.ode_nfe = (8, 16) if tiny else (8, 16, 32) if cpu else (8, 16, 32, 64)
  else:
    c.eval.steps = (1, 2, 4)
    c.eval.ode_nfe = ()
