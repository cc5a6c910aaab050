"""Reference FID statistics of a dataset, saved with provenance.

  python -m fmjax.evaluation.reference_stats --dataset cifar10 --split train --out cifar10_train.npz
  python -m fmjax.evaluation.reference_stats --image_folder /data/imagenet/train --resolution 256 \
      --out imagenet256_train.npz      # an ImageNet-style folder, ADM center crop at 256

Reads any random-access source of examples (a TFDS `data_source`, a grain source, or anything
with `len()` and `[i]` returning a dict holding an image), splits the first `num_samples`
examples over the processes, extracts the standard FID Inception features (TF1 resize to 299,
the 2015 graph) over all devices, and saves mean, covariance and provenance
(dataset, split, count, resize mode, feature-extractor digest, and for an image folder the
crop) as an .npz that `fid.load_statistics` reads. The standard reference is the full training
split. Unreadable images of a folder are reported by path and left out (the count says how
many images the statistics hold).
"""

from __future__ import annotations

import argparse
import sys
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
                   process_count: int | None = None,
                   skipped: list | None = None) -> Iterator[np.ndarray]:
  """Host-local uint8 batches covering examples [0, num_samples) of `source` once, over all hosts.

  Process p reads examples p, p + P, p + 2P, ... Every process yields the same number of
  batches (the last ones possibly smaller or empty), as `fid.compute_statistics` requires.
  skipped: when a list, unreadable images (`image_folder.UnreadableImageError`) are left out,
  appended to it and reported on stderr; otherwise they raise.
  """
  p = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if num_samples > len(source):
    raise ValueError(f'num_samples {num_samples} > {len(source)} examples in the source')
  mine = np.arange(p, num_samples, count)
  per_host = -(-num_samples // count)
  for start in range(0, per_host, local_batch):
    idx = mine[start:start + local_batch]
    images = [image for image in (_read(source, int(i), image_key, skipped) for i in idx)
              if image is not None]
    yield np.stack(images) if images else np.zeros((0, 1, 1, 3), np.uint8)


def _read(source, index: int, image_key: str, skipped: list | None):
  from fmjax.data import image_folder   # pylint: disable=import-outside-toplevel
  try:
    example = source[index]
  except image_folder.UnreadableImageError as e:
    if skipped is None:
      raise
    skipped.append(e.path)
    print(f'reference_stats: skipping unreadable image {e}', file=sys.stderr, flush=True)
    return None
  return _as_rgb_uint8(example[image_key] if image_key else example)


def compute_reference_statistics(source, *, dataset: str, split: str,
                                 num_samples: int | None = None, batch_size: int = 200,
                                 image_key: str = 'image', params=None, mesh=None,
                                 data_axis='data', skipped: list | None = None,
                                 **provenance) -> fid.Statistics:
  """FID statistics of the first `num_samples` (default: all) examples of `source`.

  skipped: a list to collect unreadable images in (left out, so the statistics hold fewer
  images; see `source_batches`); provenance: extra fields, e.g. the crop."""
  count = len(source) if num_samples is None else num_samples
  extractor = fid.FeatureExtractor(params, batch_size=batch_size, mesh=mesh, data_axis=data_axis)
  batches = source_batches(source, count, extractor.local_batch, image_key, skipped=skipped)
  return fid.compute_statistics(extractor, batches, None if skipped is not None else count,
                                dataset=dataset, split=split, **provenance)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  what = parser.add_mutually_exclusive_group(required=True)
  what.add_argument('--dataset', help='TFDS name, e.g. cifar10')
  what.add_argument('--image_folder', help='an ImageNet-style folder: one sub-folder of images per class')
  parser.add_argument('--resolution', type=int, default=256,
                      help='--image_folder: ADM center crop to this size (0: the images as they are)')
  parser.add_argument('--split', default='train')
  parser.add_argument('--out', required=True, help='output .npz')
  parser.add_argument('--num_samples', type=int, default=None, help='default: the whole split')
  parser.add_argument('--batch_size', type=int, default=200)
  parser.add_argument('--data_dir', default=None, help='TFDS data_dir (prepared, array_record)')
  parser.add_argument('--image_key', default='image')
  parser.add_argument('--weights', default=None, help='Inception checkpoint (default: the cache)')
  args = parser.parse_args(argv)
  params = inception.load_params(args.weights)   # a missing weights file stops before any reading
  skipped, extra = None, {}
  if args.image_folder:
    from fmjax.data import image_folder   # pylint: disable=import-outside-toplevel
    source = image_folder.ImageFolderSource(args.image_folder, args.resolution or None)
    dataset, skipped = args.image_folder, []
    extra['crop'] = image_folder.crop_name(args.resolution) if args.resolution else 'none'
  else:
    import tensorflow_datasets as tfds  # only the CLI needs TFDS
    source = tfds.data_source(args.dataset, split=args.split, data_dir=args.data_dir)
    dataset = args.dataset
  stats = compute_reference_statistics(
      source, dataset=dataset, split=args.split, num_samples=args.num_samples,
      batch_size=args.batch_size, image_key=args.image_key, params=params,
      mesh=sharding.make_mesh(), data_axis=sharding.BATCH_AXES, skipped=skipped, **extra)
  if jax.process_index() == 0:
    fid.save_statistics(args.out, stats)
    if skipped:
      print(f'{len(skipped)} unreadable image(s) left out: {skipped}')
    print(f'saved {args.out}: {stats.provenance}')


if __name__ == '__main__':
  main()
