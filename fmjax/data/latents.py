r"""imagenet256_latents: precomputed VAE latents of ImageNet 256 x 256 as a local TFDS dataset.

MeanFlow / iMF / DiT train on SD-VAE latents (32 x 32 x 4, scaled by 0.18215) of ImageNet
images center-cropped to 256 x 256 (Peebles & Xie 2023; Geng et al. 2025). Encoding needs
ImageNet and the VAE weights, neither of which can be fetched on these machines, so fmjax
takes the latents as NumPy shards produced wherever both exist, e.g. with diffusers:

  latents = vae.encode(images).latent_dist.sample() * 0.18215     # [N, 4, 32, 32] (torch, NCHW)
  np.savez(f'shard_{i:05d}.npz', latents=latents.permute(0, 2, 3, 1).numpy(), labels=labels)

and builds the dataset the training loop reads (`config.data.name = 'imagenet256_latents'`):

  python -m fmjax.data.latents --shards='/data/latents/train_*.npz' --split=train \
      --data_dir=~/tensorflow_datasets

Each shard holds `latents` float32 [N, 32, 32, 4] (channels last, already scaled) and
`labels` int [N] in [0, 1000). Run once per split; the dataset is ArrayRecord, read without
TensorFlow by `tfds.data_source`.
"""

from __future__ import annotations

import argparse
import glob
import os

import numpy as np

from fmjax.data import local_tfds

NAME, VERSION = 'imagenet256_latents', '1.0.0'
LATENT_SHAPE = (32, 32, 4)
NUM_CLASSES = 1000


def read_shard(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(latents float32 [N, 32, 32, 4], labels int64 [N]) of one shard, checked."""
  with np.load(path) as shard:
    missing = {'latents', 'labels'} - set(shard.files)
    if missing:
      raise ValueError(f'{path}: missing arrays {sorted(missing)}; a shard holds `latents` '
                       f'[N, 32, 32, 4] and `labels` [N] (see python -m fmjax.data.latents --help).')
    latents, labels = shard['latents'].astype(np.float32), shard['labels'].astype(np.int64)
  if latents.shape[1:] != LATENT_SHAPE:
    hint = ' (channels first? transpose to N, H, W, C)' if latents.shape[1:] == (4, 32, 32) else ''
    raise ValueError(f'{path}: latents have shape {latents.shape}, expected [N, 32, 32, 4]{hint}.')
  if labels.shape != latents.shape[:1] or labels.min(initial=0) < 0 or labels.max(initial=0) >= NUM_CLASSES:
    raise ValueError(f'{path}: labels must be [N] ints in [0, {NUM_CLASSES}), got shape {labels.shape}.')
  return latents, labels


def build(shard_paths: list[str], split: str, data_dir: str) -> str:
  """Writes `split` of imagenet256_latents from the shards; returns the version folder."""
  import tensorflow_datasets as tfds   # heavy: only building needs it

  if not shard_paths:
    raise FileNotFoundError('No latent shards given (--shards matched nothing).')

  def examples():
    index = 0
    for path in sorted(shard_paths):
      latents, labels = read_shard(path)
      for latent, label in zip(latents, labels):
        yield index, {'latent': latent, 'label': int(label)}
        index += 1

  return local_tfds.build(
      NAME, VERSION, data_dir, 'SD-VAE latents (x 0.18215) of ImageNet 256 x 256 center crops.',
      {'latent': tfds.features.Tensor(shape=LATENT_SHAPE, dtype=np.float32),
       'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES)},
      {split: examples})


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--shards', required=True, help='glob of .npz shards')
  parser.add_argument('--split', default='train')
  parser.add_argument('--data_dir', default=os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))
  args = parser.parse_args(argv)
  path = build(glob.glob(os.path.expanduser(args.shards)), args.split, args.data_dir)
  print(f'{NAME} ({args.split}) ready in {path}; train with --config.data.data_dir={os.path.expanduser(args.data_dir)}')


if __name__ == '__main__':
  main()
