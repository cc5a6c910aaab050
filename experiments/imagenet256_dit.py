r"""ImageNet 256x256 in SD-VAE latents (32 x 32 x 4) with a DiT: MeanFlow or improved MeanFlow.

Follows MeanFlow (Geng et al. 2025, arXiv 2505.13447, Table 2: DiT-B/2 ... XL/2, 1-NFE FID
on ImageNet 256) and, partly, improved MeanFlow (iMF: the model's own velocity as the jvp
tangent; iMF's guidance scale as a network input and its auxiliary head are NOT implemented
yet, see docs/methods.md). Classifier-free guidance is folded into the target with omega (and
kappa) as in MeanFlow Sec. 4.2. The per-size omega / kappa below are not checked against the
paper's configuration table (docs/methods.md, "Experiment presets").

Prepare the latents once (ImageNet from its official source, encoded with the SD VAE)
into an array_record TFDS folder `imagenet256_latents` with features {'latent': float32
[32, 32, 4], 'label': int}; see docs/training.md.
Run (TPU v4-64 / 8x8 GPUs; launch the same command on every host):
  python -m fmjax.main --config=experiments/imagenet256_dit.py:meanflow,B --workdir=gs://BUCKET/mf_b2 --config.data.data_dir=DATA_DIR
  python -m fmjax.main --config=experiments/imagenet256_dit.py:imf,XL --workdir=gs://BUCKET/imf_xl2 --config.data.data_dir=DATA_DIR

ARG = RULE[,SIZE] with RULE in meanflow | imf and SIZE in B | M | L | XL (patch size 2).
"""

from fmjax import configs

_SIZES = {'B': (768, 12, 12), 'M': (1024, 16, 16), 'L': (1024, 24, 16), 'XL': (1152, 28, 16)}


def get_config(arg=None):
  rule, size = 'meanflow', 'B'
  if arg:
    parts = arg.split(',')
    rule = parts[0] or rule
    size = parts[1] if len(parts) > 1 else size
  if rule not in ('meanflow', 'imf') or size not in _SIZES:
    raise ValueError(f'experiments/imagenet256_dit.py:{arg}: RULE in meanflow | imf, SIZE in {sorted(_SIZES)}.')
  width, depth, heads = _SIZES[size]
  c = configs.base_config()
  c.data.name = 'imagenet256_latents'
  c.data.num_classes = 1000
  c.model.name = 'dit'
  c.model.time_conditioning = 't_gap'
  c.model.dtype = 'bfloat16'
  c.model_defaults.dit = {'patch_size': 2, 'hidden': width, 'depth': depth, 'num_heads': heads}
  c.flow_map.parameterization = 'meanflow'
  c.loss.name = rule
  c.loss_defaults[rule] = {'weighting': 'adaptive', 'adaptive_power': 1.0, 'diagonal_fraction': 0.75,
                           'label_dropout': 0.1, 'omega': 2.0 if size in ('B',) else 1.0,
                           'kappa': 0.0 if size in ('B',) else 0.92}
  c.train.batch_size = 256
  c.train.num_steps = 1_200_000 // 5      # 240 epochs at batch 256 (MeanFlow Table 2 setting, shortened x5)
  c.train.log_every = 500
  c.train.eval_every = 50_000
  c.train.checkpoint_every = 10_000
  c.train.keep_every = 100_000
  c.optim.learning_rate = 1e-4
  c.optim.b2 = 0.95
  c.optim.warmup_steps = 0
  c.optim.ema_decays = (0.9999,)
  c.sharding.fsdp = 8                      # shard DiT weights and Adam moments over 8 devices
  c.sharding.fsdp_min_size = 2**16
  c.eval.steps = (1, 2)
  c.eval.grid_size = 4
  return c
