"""Reference FID statistics of a dataset, saved with provenance.

  python -m fmjax.evaluation.reference_stats --dataset cifar10 --split train --out cifar10_train.npz

Reads any random-access source of examples (a TFDS `data_source`, a grain source, or anything
with `len()` and `[i]` returning a dict holding an image), splits the first `num_samples`
examples over the processes, extracts the standard FID Inception features (TF1 resize to 299,
the 2015 graph) over all devices, and saves mean, covariance and provenance
(dataset, split, count, resize mode, feature-extractor digest) as an .npz that
`fid.load_statistics` reads. The standard reference is the full training split.
"""

from __future__ import annotations

import argparse
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from fmjax import sharding
from fmjax.evaluation import fid, inception


def _as_rgb_uint8(image) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:  # grayscale datasets: the Inception net takes RGB
    image = np.repeat(image, 3, axis=-1)
  if image.dtype != np.uint8 or image.shape[-1] != 3:
    raise ValueError(f'expected uint8 HWC images with 1 or 3 channels, got {image.dtype} '
                     f'{image.shape}; convert float images with resize.to_uint8 first')
  return image


def source_batches(source: Sequence[Any], num_samples: int, local_batch: int,
                   image_key: str = 'image', process_index: int | None = None,
                   process_count: int | None = None) -> Iterator[np.ndarray]:
  """Host-local uint8 batches covering examples [0, num_samples) of `source` once, over all hosts.

  Process p reads examples p, p + P, p + 2P, ... Every process yields the same number of
  batches (the last ones possibly smaller or empty), as `fid.compute_statistics` requires.
  """
  p = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if num_samples > len(source):
    raise ValueError(f'num_samples {num_samples} > {len(source)} examples in the source')
  mine = np.arange(p, num_samples, count)
  per_host = -(-num_samples // count)
  for start in range(0, per_host, local_batch):
    idx = mine[start:start + local_batch]
    images = [_as_rgb_uint8(source[int(i)][image_key] if image_key else source[int(i)])
              for i in idx]
    yield np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)


def compute_reference_statistics(source, *, dataset: str, split: str,
                                 num_samples: int | None = None, batch_size: int = 200,
                                 image_key: str = 'image', params=None, mesh=None,
                                 data_axis='data') -> fid.Statistics:
  """FID statistics of the first `num_samples` (default: all) examples of `source`."""
  num_samples = len(source) if num_samples is None else num_samples
  extractor = fid.FeatureExtractor(params, batch_size=batch_size, mesh=mesh, data_axis=data_axis)
  batches = source_batches(source, num_samples, extractor.local_batch, image_key)
  return fid.compute_statistics(extractor, batches, num_samples, dataset=dataset, split=split)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--dataset', required=True, help='TFDS name, e.g. cifar10')
  parser.add_argument('--split', default='train')
  parser.add_argument('--out', required=True, help='output .npz')
  parser.add_argument('--num_samples', type=int, default=None, help='default: the whole split')
  parser.add_argument('--batch_size', type=int, default=200)
  parser.add_argument('--data_dir', default=None, help='TFDS data_dir (prepared, array_record)')
  parser.add_argument('--image_key', default='image')
  parser.add_argument('--weights', default=None, help='Inception checkpoint (default: the cache)')
  args = parser.parse_args(argv)
  import tensorflow_datasets as tfds  # only the CLI needs TFDS
  source = tfds.data_source(args.dataset, split=args.split, data_dir=args.data_dir)
  stats = compute_reference_statistics(
      source, dataset=args.dataset, split=args.split, num_samples=args.num_samples,
      batch_size=args.batch_size, image_key=args.image_key,
      params=inception.load_params(args.weights), mesh=sharding.make_mesh(),
      data_axis=sharding.BATCH_AXES)
  if jax.process_index() == 0:
    fid.save_statistics(args.out, stats)
    print(f'saved {args.out}: {stats.provenance}')


if __name__ == '__main__':
  main()
