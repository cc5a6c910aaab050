r"""MNIST digits in the latent space of a small KL autoencoder: flow matching, LSD, MeanFlow, or a
flow map distilled from the flow-matching run (LMD, progressive distillation).

The ImageNet 256 pipeline (experiments/imagenet256_dit.py) at MNIST size, so that it trains on a
CPU: a KL autoencoder trained in-repo (fmjax.autoencoders.train: 28 x 28 digits -> a 7 x 7 x 4
latent grid, saved in diffusers' folder layout), the mnist5k latent dataset built from it
(python -m fmjax.data.latents build), and a class-conditional DiT with patch size 1 on the latent
grid (49 tokens), label dropout 0.1 for classifier-free guidance. Rules: flow matching (Lipman
et al. 2023), LSD (Boffi, Albergo & Vanden-Eijnden, arXiv 2505.18825, Sec. 3), MeanFlow (Geng et
al. 2025, arXiv 2505.13447), and from the flow-matching teacher LMD (Boffi et al. 2406.07507,
Sec. 3) or progressive distillation (Salimans & Ho 2022) with `--config.teacher.workdir`.
Evaluation decodes the samples and scores them by FID against the 5,000 digits and by the
in-repo digit classifier (`--config.eval.classifier_dir`).

The whole chain from a fresh clone, each stage skipped when its output exists:
  OUT=runs/mnist_latent bash benchmarks/mnist_latent.sh
or by hand:
  python -m fmjax.data.mnist5k --data_dir=$HOME/tensorflow_datasets
  python -m fmjax.autoencoders.train --data_dir=$HOME/tensorflow_datasets --out=runs/ml/autoencoder
  python -m fmjax.data.latents build --source=tfds:mnist5k --autoencoder=runs/ml/autoencoder \
      --data_dir=$HOME/tensorflow_datasets
  python -m fmjax.main --config=experiments/mnist_latent.py:flow_matching --workdir=runs/ml/flow_matching \
      --config.autoencoder=runs/ml/autoencoder --config.data.data_dir=$HOME/tensorflow_datasets
  python -m fmjax.main --config=experiments/mnist_latent.py:lmd --workdir=runs/ml/lmd \
      --config.autoencoder=runs/ml/autoencoder --config.data.data_dir=$HOME/tensorflow_datasets \
      --config.teacher.workdir=runs/ml/flow_matching
(add --config.teacher.guidance_scale=1.5 to distil the teacher under classifier-free guidance: the
map then draws guided digits in one evaluation per step.)

ARG = RULE[,SIZE] with RULE in flow_matching | lsd | meanflow | lmd | progressive and SIZE in
cpu (default: sized for <= 45 min per model on 2 CPU cores) | h100 | tiny (seconds, for tests).
"""

from fmjax import configs

RULES = ('flow_matching', 'lsd', 'meanflow', 'lmd', 'progressive')
SIZES = ('cpu', 'h100', 'tiny')
# Updates, batch and peak learning rate per size. cpu: sized so that each model trains in about
# 45 min on 2 CPU cores (the measured updates per second are in docs/results.md; a DiT of width
# 192 and depth 6 took 1.5 s per update of batch 128 there, too slow for this budget). At equal
# compute, 8,000 updates of batch 64 at 1e-3 learned far faster than 4,000 of batch 128 at 3e-4
# (flow matching's share of confidently classified digits: 49 % after 4,000 updates of 64,
# against 25 % after 4,000 of 128; docs/results.md). h100 keeps its batch of 128 at 3e-4
# (not measured at the other setting).
STEPS = {'cpu': 8000, 'h100': 20000, 'tiny': 3}
BATCH = {'cpu': 64, 'h100': 128, 'tiny': 8}
LEARNING_RATE = {'cpu': 1e-3, 'h100': 3e-4, 'tiny': 1e-3}
NETWORK = {'cpu': {'patch_size': 1, 'hidden': 128, 'depth': 4, 'num_heads': 4},
           'h100': {'patch_size': 1, 'hidden': 192, 'depth': 6, 'num_heads': 6},
           'tiny': {'patch_size': 1, 'hidden': 32, 'depth': 1, 'num_heads': 2}}


def get_config(arg=None):
  parts = (arg or '').split(',')
  rule = parts[0] or 'lsd'
  size = parts[1] if len(parts) > 1 and parts[1] else 'cpu'
  if rule not in RULES or size not in SIZES:
    raise ValueError(f'experiments/mnist_latent.py:{arg}: ARG = RULE[,SIZE], RULE in {RULES}, '
                     f'SIZE in {SIZES}.')
  tiny = size == 'tiny'
  c = configs.base_config()
  c.data.name = 'mnist5k_latents'
  c.data.num_classes = 10
  c.model.name = 'dit'
  c.model_defaults.dit = dict(NETWORK[size])
  c.loss.name = rule
  for name in RULES:
    c.loss_defaults[name] = {'label_dropout': 0.1}
  # MeanFlow's adaptive weight and logit-normal times are its paper's image settings.
  c.loss_defaults.meanflow = {'label_dropout': 0.1, 'weighting': 'adaptive', 'adaptive_power': 1.0}
  c.train.batch_size = BATCH[size]
  c.train.num_steps = STEPS[size]
  c.train.log_every = 1 if tiny else 250
  c.train.checkpoint_every = 3 if tiny else 1000
  c.optim.learning_rate = LEARNING_RATE[size]
  c.optim.warmup_steps = 1 if tiny else 500
  c.optim.schedule = 'constant' if tiny else 'cosine'
  c.optim.final_lr_fraction = 0.1
  c.optim.ema_decays = (0.999,)
  c.eval.steps = (1, 2, 4)
  c.eval.ode_method = 'euler'
  c.eval.ode_nfe = (8, 16, 32)
  c.eval.grid_size = 10 if not tiny else 2
  c.eval.fid_num_samples = 16 if tiny else 5000
  # On 2 CPU cores batches of 100 run the Inception features ~30 % faster than batches of 500
  # (3.4 against 2.6 images/s on the same row) and need far less memory (peak RSS 4 GB against 15 GB).
  c.eval.fid_batch_size = {'cpu': 100, 'h100': 500, 'tiny': 8}[size]
  c.eval.precision_recall_samples = 0
  return c
