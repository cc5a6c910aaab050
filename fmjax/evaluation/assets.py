"""Where FID's inputs live, and an early check that they exist.

FID needs the Inception weights (`prepare_inception`) and reference statistics of the training
set (`reference_stats`). `check_fid_ready` fails before any training when either is missing,
with the commands that make them.
"""

from __future__ import annotations

import os

from fmjax import configs
from fmjax.evaluation import fid
from fmjax.evaluation import inception


class MissingFIDAssetsError(FileNotFoundError):
  """The Inception weights or the FID reference statistics are missing (commands in the message)."""


def default_reference_path(dataset: str, split: str) -> str:
  root = os.path.dirname(inception.default_cache_dir())
  return os.path.join(root, 'fid_stats', f'{dataset}_{split}.npz')


def _latent_split_info(config) -> dict:
  """A latent dataset's record of its split (source, crop, resolution), or {} (pixel data,
  older pre-scaled latents)."""
  if not configs.is_latent_dataset(config.data.name):
    return {}
  from fmjax.data import latents, pipelines   # pylint: disable=import-outside-toplevel
  try:
    info = latents.read_info(pipelines.find_prepared(config.data.name, config.data.data_dir)) or {}
  except (FileNotFoundError, ValueError):
    return {}
  split = info.get('splits', {}).get(config.data.split, {})
  return {**split, 'crop': info.get('crop'), 'resolution': info.get('resolution')}


def reference_images(config) -> tuple[str, str]:
  """(dataset, split) of the images FID compares samples with: the data itself, or for a latent
  dataset the images it was encoded from (a TFDS set, or a folder named after the dataset)."""
  source = _latent_split_info(config).get('source', '')
  if source.startswith('tfds:'):
    return source[len('tfds:'):], _latent_split_info(config).get('source_split') or config.data.split
  if configs.is_latent_dataset(config.data.name):
    return config.data.name[:-len(configs.LATENT_SUFFIX)], config.data.split
  return config.data.name, config.data.split


def reference_path(config) -> str:
  return config.eval.fid_reference or default_reference_path(*reference_images(config))


def weights_path(config) -> str:
  return config.eval.inception_weights or os.path.join(inception.default_cache_dir(),
                                                       inception.CHECKPOINT_NAME)


def fid_enabled(config) -> bool:
  """FID applies to image sets and latent datasets (decoded first) with config.eval.fid on."""
  return bool(config.eval.fid) and (config.data.name in configs.IMAGE_DATASETS
                                    or configs.is_latent_dataset(config.data.name))


def deferred(config) -> bool:
  """FID on, with the sweep writing sample batches for `reference_batches` to score instead of computing features."""
  return fid_enabled(config) and config.eval.get('fid_features', 'inception') == 'deferred'


def reference_command(config, out: str | None = None) -> str:
  data_dir = config.data.data_dir or '~/tensorflow_datasets'
  count = (f' --num_samples {config.eval.fid_reference_samples}'
           if config.eval.fid_reference_samples else '')
  out = out or reference_path(config)
  source = _latent_split_info(config).get('source', '')
  if source.startswith('folder:'):
    resolution = _latent_split_info(config).get('resolution') or 0
    return (f'python -m fmjax.evaluation.reference_stats --image_folder {source[len("folder:"):]} '
            f'--resolution {resolution}{count} --out {out}')
  if configs.is_latent_dataset(config.data.name) and not source:
    return (f'python -m fmjax.evaluation.reference_stats --image_folder IMAGES --resolution 256 '
            f'--out {out}   (the images the latents were encoded from)')
  dataset, split = reference_images(config)
  return (f'python -m fmjax.evaluation.reference_stats --dataset {dataset} '
          f'--split {split} --data_dir {data_dir}{count} --out {out}')


def check_fid_ready(config) -> None:
  """Raises MissingFIDAssetsError before any training when FID is on and an input is missing."""
  if not fid_enabled(config) or deferred(config):
    return   # deferred: the images are scored later, where the weights and statistics are
  missing = []
  weights = weights_path(config)
  if not os.path.exists(weights):
    missing.append(f'the Inception weights ({weights}); make them with\n'
                   f'  python -m fmjax.evaluation.prepare_inception'
                   + (f' --cache_dir {os.path.dirname(weights)}'
                      if config.eval.inception_weights else ''))
  reference = reference_path(config)
  if not os.path.exists(reference):
    missing.append(f'the reference statistics ({reference}); compute them (after the weights) with\n'
                   f'  {reference_command(config, reference)}')
  if missing:
    raise MissingFIDAssetsError(
        f'FID evaluation of {config.data.name} needs ' + '\n and '.join(missing) +
        '\nor pass --config.eval.fid_reference=PATH for statistics made elsewhere (e.g. ADM\'s '
        'reference batch VIRTUAL_imagenet256_labeled.npz for ImageNet 256), or disable FID with '
        '--config.eval.fid=False.')


def load_reference(config):
  """The reference file (`reference_batches.Reference`): fmjax statistics, an ADM reference
  batch (images, optionally mu/sigma) or TTUR statistics."""
  from fmjax.evaluation import reference_batches   # pylint: disable=import-outside-toplevel
  return reference_batches.read_reference(reference_path(config))
