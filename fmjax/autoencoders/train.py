"""Training a small KL autoencoder (SD-VAE's architecture) on mnist5k, and its reconstruction FID.

  python -m fmjax.data.mnist5k --data_dir=DIR                   # once, offline
  python -m fmjax.autoencoders.train --data_dir=DIR --out=FOLDER [--fid_samples=1000]

The objective is the KL-regularized autoencoder of latent diffusion (Rombach et al. 2022,
"High-resolution image synthesis with latent diffusion models", arXiv 2112.10752, Sec. 3 and
App. G) without its adversarial and perceptual terms. Per image, as the LDM code sums them
(taming-transformers' `LPIPSWithDiscriminator`: the reconstruction summed over pixels, the KL over
latent dimensions, both averaged over the batch; its learned log-variance left at 0):

  loss = sum_pixels rho(x - D(z)) + kl_weight * KL(q(z|x) || N(0, I)),   z = mean + std * eps,

rho = |.| (L1, LDM's choice) or (.)^2, eps ~ N(0, I) (the reparameterization), and
KL = 0.5 * sum(mean^2 + std^2 - 1 - log std^2). After training, the latent scale is set as for
Stable Diffusion (Sec. 4.3.2 / App. D.1; 0.18215 there): `scaling_factor` = 1 / std of the
posterior samples z over the training split, so `scaling_factor * z` has unit variance for the
latent model. The folder is written with `autoencoders.save` (diffusers' layout, read by
`autoencoders.load`), with `train_info.json` beside it: options, time, losses, the test split's
reconstruction error, the latent statistics, the command and (with --fid_samples) the FID of
the reconstructions.

Sizes (explicit flags override a size's fields): `tiny` trains in seconds, for tests; `default`
maps 28x28 digits to 7x7x4 latents and was chosen on a shared 2-core CPU (~20 minutes for its
1,200 steps of 64 digits, ~1 s a step under load). What was measured there, L1, lr 2e-3:
  widths (16, 32, 64) against (32, 64, 64): 1.7x the steps per second (the 28x28 and 14x14
    convolutions dominate), no worse after 120 steps;
  mid-block attention: 10-15% slower per step, 0.8 dB lower test PSNR after 400 steps: off;
  kl_weight 1e-6 (LDM's) and 1e-5: the same PSNR, KL and latent scale after 400 steps, so the
    KL term only keeps the posterior from collapsing; latent_channels 8: +0.4 dB after 120
    steps at twice the latent size, so 4.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmjax.autoencoders import kl
from fmjax.autoencoders import loading
from fmjax.autoencoders import vae as vae_lib

INFO_NAME = 'train_info.json'
RECON_LOSSES = ('l1', 'l2')
# Images per jitted call when encoding / decoding whole splits after training.
EVAL_BATCH = 250

# Network fields of each size (AutoencoderConfig fields; in/out channels are MNIST's 1).
SIZES: dict[str, dict[str, Any]] = {
    'default': dict(block_out_channels=(16, 32, 64), layers_per_block=1, latent_channels=4,
                    norm_num_groups=8, mid_block_add_attention=False),
    'tiny': dict(block_out_channels=(8, 8), layers_per_block=1, latent_channels=2,
                 norm_num_groups=4, mid_block_add_attention=False),
}
# Training fields of each size.
SIZE_OPTIONS: dict[str, dict[str, Any]] = {
    'default': dict(steps=1200, batch_size=64),
    'tiny': dict(steps=6, batch_size=8),
}


@dataclasses.dataclass(frozen=True)
class Options:
  """What `train` does; `main` fills it from the command line."""
  data_dir: str
  size: str = 'default'
  steps: int | None = None           # None: the size's
  batch_size: int | None = None      # None: the size's
  learning_rate: float = 2e-3
  warmup_steps: int = 50
  kl_weight: float = 1e-6
  recon_loss: str = 'l1'
  seed: int = 0
  log_every: int = 100
  network: dict = dataclasses.field(default_factory=dict)   # AutoencoderConfig overrides
  max_train_images: int | None = None   # a prefix of the train split (tests)

  def __post_init__(self):
    if self.size not in SIZES:
      raise ValueError(f'size {self.size!r}: use one of {list(SIZES)}.')
    if self.recon_loss not in RECON_LOSSES:
      raise ValueError(f'recon_loss {self.recon_loss!r}: use one of {list(RECON_LOSSES)}.')
    for name in ('steps', 'batch_size'):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f'{name} must be >= 1, got {getattr(self, name)}.')
    if not self.learning_rate > 0:
      raise ValueError(f'learning_rate must be > 0, got {self.learning_rate}.')
    if not self.kl_weight >= 0:
      raise ValueError(f'kl_weight must be >= 0, got {self.kl_weight}.')
    if self.warmup_steps < 0 or self.log_every < 1:
      raise ValueError('warmup_steps must be >= 0 and log_every >= 1.')
    if self.max_train_images is not None and self.max_train_images < self.batch:
      raise ValueError(f'max_train_images {self.max_train_images} < batch_size {self.batch}.')

  @property
  def num_steps(self) -> int:
    return self.steps or SIZE_OPTIONS[self.size]['steps']

  @property
  def batch(self) -> int:
    return self.batch_size or SIZE_OPTIONS[self.size]['batch_size']

  def config(self) -> kl.AutoencoderConfig:
    """The network: MNIST's one channel in and out, the size's fields, then the overrides."""
    return kl.AutoencoderConfig(in_channels=1, out_channels=1, **{**SIZES[self.size], **self.network})


# ---------------------------------------------------------------------------------------------
# The objective.


def kl_divergence(mean, std):
  """KL(N(mean, std^2) || N(0, I)) per example: 0.5 * sum(mean^2 + std^2 - 1 - log std^2) over
  every axis but the first."""
  terms = jnp.square(mean) + jnp.square(std) - 1.0 - 2.0 * jnp.log(std)
  return 0.5 * jnp.sum(terms.reshape(terms.shape[0], -1), axis=1)


def loss_terms(vae: vae_lib.Autoencoder, params, images, key, *, kl_weight: float,
               recon_loss: str = 'l1'):
  """(loss, metrics) of a batch: the module docstring's objective, averaged over the batch.

  metrics: `recon` (the per-image reconstruction sum), `kl` (per image), `mse` (per pixel, of the
  sampled reconstruction), `std` (mean posterior std).
  """
  mean, std = vae.encode_fn(params, images)
  # The reparameterization: the decoder sees a posterior sample, and the gradient reaches the
  # encoder's mean and std through it.
  z = mean + std * jax.random.normal(key, mean.shape, mean.dtype)
  diff = vae.decode_fn(params, z) - images
  rho = jnp.abs(diff) if recon_loss == 'l1' else jnp.square(diff)
  recon = jnp.mean(jnp.sum(rho.reshape(rho.shape[0], -1), axis=1))
  kl_term = jnp.mean(kl_divergence(mean, std))
  loss = recon + kl_weight * kl_term
  return loss, {'loss': loss, 'recon': recon, 'kl': kl_term, 'mse': jnp.mean(jnp.square(diff)),
                'std': jnp.mean(std)}


def optimizer(options: Options) -> optax.GradientTransformation:
  """Adam, linear warmup then cosine decay to 0 (short runs: the decay, not a long tail, sets the
  final reconstruction)."""
  steps = options.num_steps
  warmup = min(options.warmup_steps, steps - 1)
  schedule = optax.warmup_cosine_decay_schedule(0.0, options.learning_rate, max(warmup, 1),
                                                max(steps, warmup + 1), 0.0)
  return optax.adam(schedule, b1=0.9, b2=0.99)


def make_train_step(vae: vae_lib.Autoencoder, tx: optax.GradientTransformation, *,
                    kl_weight: float, recon_loss: str):
  """A jitted `(params, opt_state, images, key) -> (params, opt_state, metrics)`."""
  grad_fn = jax.value_and_grad(
      lambda p, x, k: loss_terms(vae, p, x, k, kl_weight=kl_weight, recon_loss=recon_loss),
      has_aux=True)

  @jax.jit
  def step(params, opt_state, images, key):
    (_, metrics), grads = grad_fn(params, images, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  return step


# ---------------------------------------------------------------------------------------------
# Statistics of a trained network.


def posterior_sample(mean: np.ndarray, std: np.ndarray, seed: int) -> np.ndarray:
  """z = mean + std * eps (float64 numpy), eps from NumPy's generator at `seed` drawn at once for
  the whole array (so the draw does not depend on how the images were batched)."""
  eps = np.random.default_rng(seed).standard_normal(np.shape(mean))
  return np.asarray(mean, np.float64) + np.asarray(std, np.float64) * eps


def latent_statistics(vae: vae_lib.Autoencoder, images, seed: int = 0) -> dict[str, Any]:
  """The scale of the latents a latent model would train on.

  `scaling_factor` = 1 / std of all entries of z = mean + std * eps over `images` (the std about
  their common mean, as Stable Diffusion's 0.18215 was measured); per channel, the mean and std
  of z and of scaling_factor * z, and the mean posterior std (how much of z is noise).
  """
  mean, std = vae.encode(images)
  z = posterior_sample(mean, std, seed)
  scale = 1.0 / float(z.std())
  channels = z.reshape(-1, z.shape[-1])
  return {'scaling_factor': scale, 'std': float(z.std()), 'mean': float(z.mean()),
          'channel_mean': channels.mean(0).tolist(), 'channel_std': channels.std(0).tolist(),
          'scaled_channel_mean': (scale * channels.mean(0)).tolist(),
          'scaled_channel_std': (scale * channels.std(0)).tolist(),
          'posterior_mean_std': float(mean.reshape(-1, mean.shape[-1]).std()),
          'posterior_std_mean': std.reshape(-1, std.shape[-1]).mean(0).tolist(),
          'latent_shape': list(z.shape[1:]), 'count': int(z.shape[0]), 'seed': seed}


def reconstruction_error(vae: vae_lib.Autoencoder, images) -> dict[str, float]:
  """MSE (on [-1, 1] pixels) and PSNR (dB, peak-to-peak 2, i.e. on [0, 1] pixels) of decode(mean),
  and the MAE, over `images`."""
  mean, _ = vae.encode(images)
  recon = np.clip(vae.decode(mean), -1.0, 1.0)
  diff = recon.astype(np.float64) - np.asarray(images, np.float64)
  mse = float(np.mean(diff ** 2))
  return {'mse': mse, 'mae': float(np.mean(np.abs(diff))),
          'psnr': float(10.0 * np.log10(4.0 / mse)) if mse > 0 else float('inf'),
          'count': int(len(images)), 'latent': 'posterior mean', 'clipped_to': [-1.0, 1.0]}


# ---------------------------------------------------------------------------------------------
# Training.


def batches(images: np.ndarray, batch_size: int, seed: int) -> Iterator[np.ndarray]:
  """Endless batches of `images`, a fresh permutation per epoch (the last partial batch of an
  epoch is dropped, so every batch has one shape)."""
  if batch_size > len(images):
    raise ValueError(f'batch_size {batch_size} > the {len(images)} training images.')
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(len(images))
    for start in range(0, len(images) - batch_size + 1, batch_size):
      yield images[order[start:start + batch_size]]


def load_images(data_dir: str, split: str, limit: int | None = None) -> np.ndarray:
  """float32 [N, 28, 28, 1] in [-1, 1] of a prepared mnist5k split (the first `limit`)."""
  from fmjax.steering import classifier   # pylint: disable=import-outside-toplevel
  images, _ = classifier.load_split(data_dir, split)
  return images[:limit] if limit else images


def train(options: Options, *, log=print) -> tuple[vae_lib.Autoencoder, dict[str, Any]]:
  """Trains the autoencoder; returns it (with its measured scaling_factor) and the info dict."""
  config = options.config()
  images = load_images(options.data_dir, 'train', options.max_train_images)
  test_images = load_images(options.data_dir, 'test', options.max_train_images)
  vae = vae_lib.init(config, options.seed)
  tx = optimizer(options)
  step_fn = make_train_step(vae, tx, kl_weight=options.kl_weight, recon_loss=options.recon_loss)
  # Host copies: the initial parameters are committed to the Autoencoder's mesh, the step's outputs
  # are not, and that difference alone would compile the step a second time at step 2.
  params = jax.device_get(vae.params)
  opt_state = tx.init(params)
  key = jax.random.key(options.seed)
  data = batches(images, options.batch, options.seed)
  log(f'training {config} on {len(images)} mnist5k digits: {options.num_steps} steps of batch '
      f'{options.batch}, lr {options.learning_rate}, kl_weight {options.kl_weight}, '
      f'{options.recon_loss} reconstruction')

  history, window, start = [], [], time.time()
  compile_s, tick = None, time.time()
  for step in range(1, options.num_steps + 1):
    params, opt_state, metrics = step_fn(params, opt_state, next(data), jax.random.fold_in(key, step))
    window.append(metrics)
    if step == 1:
      jax.block_until_ready(params)
      compile_s = time.time() - start   # the first step includes the compilation
      tick, window = time.time(), []
      history.append({'step': 1, **{k: float(v) for k, v in metrics.items()}})
      log(f'step 1 (compiled in {compile_s:.1f}s): loss {history[-1]["loss"]:.2f}')
    elif step % options.log_every == 0 or step == options.num_steps:
      means = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
      now = time.time()
      rate = len(window) * options.batch / (now - tick)
      history.append({'step': step, **means, 'images_per_s': rate, 'elapsed_s': now - start})
      log(f'step {step}: loss {means["loss"]:.2f}  recon {means["recon"]:.2f} '
          f'({options.recon_loss} sum/image; mse {means["mse"]:.4f})  kl {means["kl"]:.1f}  '
          f'std {means["std"]:.3f}  {rate:.0f} images/s  {now - start:.0f}s')
      tick, window = now, []
  jax.block_until_ready(params)
  train_s = time.time() - start

  measured = vae_lib.Autoencoder(config, params, batch_size=EVAL_BATCH)
  stats = latent_statistics(measured, images, seed=options.seed)
  info = {'options': {**dataclasses.asdict(options), 'steps': options.num_steps,
                      'batch_size': options.batch},
          'train_images': len(images), 'train_seconds': train_s, 'compile_seconds': compile_s,
          'history': history, 'final': history[-1], 'latents': stats,
          'test_reconstruction': reconstruction_error(measured, test_images),
          'train_reconstruction': reconstruction_error(measured, images[:len(test_images)])}
  # The scale only enters the config (encode and decode do not use it).
  config = dataclasses.replace(config, scaling_factor=stats['scaling_factor'])
  info['config'] = config.to_dict()
  return vae_lib.Autoencoder(config, params, batch_size=EVAL_BATCH), info


# ---------------------------------------------------------------------------------------------
# Reconstruction FID.


def reconstruction_fid(folder: str, data_dir: str, num_samples: int, *, split: str = 'train',
                       reference: str | None = None, sample: bool = False, seed: int = 0,
                       batch_size: int = 100, real_baseline: bool = False,
                       extractor=None, log=print) -> dict[str, Any]:
  """FID of encode -> decode of the first `num_samples` digits of an mnist5k split.

  The reconstructions decode the posterior mean (the usual floor for a latent model's samples),
  or a posterior sample z = mean + std * eps with `sample=True`. They are quantized and turned to
  RGB as generated samples are (`sweep.to_rgb_uint8`), their Inception statistics computed with
  `fid.FeatureExtractor` / `fid.compute_statistics`, and compared with `reference` (default: the
  statistics `reference_stats` writes for the split, `assets.default_reference_path('mnist5k',
  split)`, which is what an mnist5k run's FID is measured against). `real_baseline=True` also
  scores the same real digits unchanged: the part of the FID that comes from the sample count
  alone, not from the autoencoder. `extractor`: a `fid.FeatureExtractor` (default: the standard
  Inception network from the cache, in batches of `batch_size`).

  Returns {'fid', 'num_samples', 'split', 'latent', 'reference', ['fid_real']}.
  """
  from fmjax.evaluation import fid, sweep   # pylint: disable=import-outside-toplevel
  reference = reference or default_reference(split)
  check_fid_assets(reference, split, data_dir, need_weights=extractor is None)
  ref_stats = fid.load_statistics(reference)
  vae = loading.load(folder, batch_size=batch_size)
  images = load_images(data_dir, split)
  if not 2 <= num_samples <= len(images):
    raise ValueError(f'num_samples {num_samples}: the {split} split has {len(images)} digits '
                     '(and FID needs at least 2).')
  images = images[:num_samples]
  if sample:
    latents = posterior_sample(*vae.encode(images), seed)
  else:
    latents = vae.encode(images)[0]
  recon = vae.decode(latents)
  extractor = extractor or fid.FeatureExtractor(batch_size=batch_size)

  def score(x, what):
    start = time.time()
    rgb = sweep.to_rgb_uint8(x)
    stats = fid.compute_statistics(
        extractor, (rgb[i:i + extractor.local_batch] for i in range(0, len(rgb), extractor.local_batch)),
        num_samples,
        dataset=f'mnist5k {what}', split=split, **({'autoencoder': vae.digest} if what != 'real' else {}))
    value = fid.fid(stats, ref_stats)
    log(f'FID of {num_samples} {what} {split} digits vs {reference}: {value:.3f} '
        f'({time.time() - start:.0f}s)')
    return value

  out = {'fid': score(recon, 'reconstructions'), 'num_samples': num_samples, 'split': split,
         'latent': 'posterior sample' if sample else 'posterior mean', 'reference': reference,
         'reference_provenance': ref_stats.provenance}
  if real_baseline:
    out['fid_real'] = score(images, 'real')
  return out


def default_reference(split: str) -> str:
  from fmjax.evaluation import assets   # pylint: disable=import-outside-toplevel
  return assets.default_reference_path('mnist5k', split)


def check_fid_assets(reference: str, split: str, data_dir: str, need_weights: bool = True) -> None:
  """Stops (before any training) when the Inception weights or the reference are missing."""
  from fmjax.evaluation import assets, inception   # pylint: disable=import-outside-toplevel
  missing = []
  weights = os.path.join(inception.default_cache_dir(), inception.CHECKPOINT_NAME)
  if need_weights and not os.path.exists(weights):
    missing.append(f'the Inception weights ({weights}); make them with\n'
                   '  python -m fmjax.evaluation.prepare_inception')
  if not os.path.exists(reference):
    missing.append(f'the reference statistics ({reference}); make them with\n'
                   f'  python -m fmjax.evaluation.reference_stats --dataset mnist5k --split {split} '
                   f'--data_dir {data_dir} --out {reference}')
  if missing:
    raise assets.MissingFIDAssetsError('The reconstruction FID needs ' + '\n and '.join(missing)
                                       + '\nor run with --fid_samples=0.')


# ---------------------------------------------------------------------------------------------
# Command line.


def check_out(out: str, overwrite: bool) -> None:
  """Refuses a non-empty `out` unless `overwrite`."""
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise FileExistsError(f'--out={out} exists and is not empty ({sorted(os.listdir(out))[:5]}); '
                          'pass --overwrite to write over it, or choose another folder.')
  if os.path.exists(out) and not os.path.isdir(out):
    raise FileExistsError(f'--out={out} exists and is not a folder.')


def save(out: str, vae: vae_lib.Autoencoder, info: dict[str, Any]) -> None:
  """The diffusers folder (`autoencoders.save`) and train_info.json beside its two files."""
  loading.save(out, vae)
  save_info(out, info)


def save_info(out: str, info: dict[str, Any]) -> None:
  with open(os.path.join(out, INFO_NAME), 'w') as f:
    json.dump(info, f, indent=2, sort_keys=True, default=_json_default)
    f.write('\n')


def _json_default(value):
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  if isinstance(value, tuple):
    return list(value)
  raise TypeError(f'{type(value).__name__} is not JSON serializable')


def _ints(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in text.split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(f'{text!r}: expected comma-separated ints, e.g. 32,64,64') from None


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data_dir', required=True, help='where mnist5k is prepared (python -m fmjax.data.mnist5k)')
  parser.add_argument('--out', required=True, help='the autoencoder folder to write')
  parser.add_argument('--overwrite', action='store_true', help='write over a non-empty --out')
  parser.add_argument('--size', default='default', choices=list(SIZES))
  parser.add_argument('--steps', type=int, default=None, help='default: the size\'s')
  parser.add_argument('--batch_size', type=int, default=None, help='default: the size\'s')
  parser.add_argument('--lr', type=float, default=Options.learning_rate)
  parser.add_argument('--warmup_steps', type=int, default=Options.warmup_steps)
  parser.add_argument('--kl_weight', type=float, default=Options.kl_weight)
  parser.add_argument('--recon_loss', default=Options.recon_loss, choices=RECON_LOSSES)
  parser.add_argument('--seed', type=int, default=Options.seed)
  parser.add_argument('--log_every', type=int, default=Options.log_every)
  parser.add_argument('--max_train_images', type=int, default=None,
                      help='train on the first N train digits (and measure on N test digits): '
                           'quick runs and tests')
  parser.add_argument('--block_out_channels', type=_ints, default=None)
  parser.add_argument('--latent_channels', type=int, default=None)
  parser.add_argument('--layers_per_block', type=int, default=None)
  parser.add_argument('--norm_num_groups', type=int, default=None)
  parser.add_argument('--mid_attention', default=None, choices=('true', 'false'),
                      help='the mid blocks\' self-attention (default: the size\'s)')
  parser.add_argument('--fid_samples', type=int, default=0,
                      help='reconstruction FID of this many train digits at the end (0: skip)')
  parser.add_argument('--fid_reference', default=None,
                      help='reference statistics (default: reference_stats\' mnist5k_train.npz)')
  parser.add_argument('--fid_only', action='store_true',
                      help='no training: the reconstruction FID of the autoencoder in --out, added '
                           'to its train_info.json')
  parser.add_argument('--fid_real_baseline', action='store_true',
                      help='also the FID of the same real digits (the sample-count floor)')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  network = {name: value for name, value in (
      ('block_out_channels', args.block_out_channels), ('latent_channels', args.latent_channels),
      ('layers_per_block', args.layers_per_block), ('norm_num_groups', args.norm_num_groups),
      ('mid_block_add_attention', None if args.mid_attention is None else args.mid_attention == 'true'))
      if value is not None}
  reference = args.fid_reference or default_reference('train')
  # Every mistake a user can make stops here, before minutes of training.
  try:
    options = Options(data_dir=args.data_dir, size=args.size, steps=args.steps,
                      batch_size=args.batch_size, learning_rate=args.lr,
                      warmup_steps=args.warmup_steps, kl_weight=args.kl_weight,
                      recon_loss=args.recon_loss, seed=args.seed, log_every=args.log_every,
                      network=network, max_train_images=args.max_train_images)
    options.config()
    if args.fid_only:
      if not os.path.isfile(os.path.join(args.out, loading.CONFIG_NAME)):
        raise FileNotFoundError(f'--fid_only: --out={args.out} holds no trained autoencoder '
                                f'({loading.CONFIG_NAME} missing).')
      if not args.fid_samples:
        raise ValueError('--fid_only needs --fid_samples > 0.')
    else:
      check_out(args.out, args.overwrite)
    from fmjax.data import pipelines   # pylint: disable=import-outside-toplevel
    path = pipelines.find_prepared('mnist5k', args.data_dir)
    if args.fid_samples:
      import tensorflow_datasets as tfds   # pylint: disable=import-outside-toplevel
      count = tfds.builder_from_directory(path).info.splits['train'].num_examples
      if not 2 <= args.fid_samples <= count:
        raise ValueError(f'--fid_samples={args.fid_samples}: use 0 (no FID) or 2 .. {count} (the '
                         'train split\'s digits).')
      check_fid_assets(reference, 'train', args.data_dir)
    elif args.fid_samples < 0:
      raise ValueError(f'--fid_samples must be >= 0, got {args.fid_samples}.')
  except (ValueError, FileExistsError, FileNotFoundError) as e:
    sys.exit(f'fmjax.autoencoders.train: {e}')

  start = time.time()
  info_path = os.path.join(args.out, INFO_NAME)
  if args.fid_only:
    info = {}
    if os.path.exists(info_path):
      with open(info_path) as f:
        info = json.load(f)
  else:
    vae, info = train(options)
    info['command'] = _command(argv)
    save(args.out, vae, info)
    test, lat = info['test_reconstruction'], info['latents']
    print(f'saved {args.out}: train {info["train_seconds"]:.0f}s; test PSNR {test["psnr"]:.2f} dB '
          f'(mse {test["mse"]:.5f}); scaling_factor {lat["scaling_factor"]:.5f}; scaled latent '
          f'channel std {np.round(lat["scaled_channel_std"], 3).tolist()}, mean '
          f'{np.round(lat["scaled_channel_mean"], 3).tolist()}')
  if args.fid_samples:
    result = reconstruction_fid(args.out, args.data_dir, args.fid_samples, reference=reference,
                                real_baseline=args.fid_real_baseline)
    # Keyed by the sample count: FIDs of different counts are different numbers (FID's bias
    # shrinks with the count), and a later --fid_only run adds to the record.
    fids = info.get('reconstruction_fid', {})
    fids[str(args.fid_samples)] = {**result, 'seconds': time.time() - start, 'command': _command(argv)}
    info['reconstruction_fid'] = fids
  if not args.fid_only:
    info['total_seconds'] = time.time() - start
  save_info(args.out, info)
  print(f'done in {time.time() - start:.0f}s')


def _command(argv) -> str:
  return shlex.join(['python', '-m', 'fmjax.autoencoders.train']
                    + (sys.argv[1:] if argv is None else list(argv)))


if __name__ == '__main__':
  main()
