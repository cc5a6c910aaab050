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


def reference_path(config) -> str:
  return config.eval.fid_reference or default_reference_path(config.data.name, config.data.split)


def weights_path(config) -> str:
  return config.eval.inception_weights or os.path.join(inception.default_cache_dir(),
                                                       inception.CHECKPOINT_NAME)


def fid_enabled(config) -> bool:
  """FID applies to pixel datasets with config.eval.fid on (latents would need the decoder)."""
  return (bool(config.eval.fid) and config.data.name in configs.IMAGE_DATASETS
          and config.data.name != 'imagenet256_latents')


def reference_command(config, out: str | None = None) -> str:
  data_dir = config.data.data_dir or '~/tensorflow_datasets'
  count = (f' --num_samples {config.eval.fid_reference_samples}'
           if config.eval.fid_reference_samples else '')
  return (f'python -m fmjax.evaluation.reference_stats --dataset {config.data.name} '
          f'--split {config.data.split} --data_dir {data_dir}{count} '
          f'--out {out or reference_path(config)}')


def check_fid_ready(config) -> None:
  """Raises MissingFIDAssetsError before any training when FID is on and an input is missing."""
  if not fid_enabled(config):
    return
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
        '\nor pass --config.eval.fid_reference=PATH for statistics made elsewhere, or disable '
        'FID with --config.eval.fid=False.')


def load_reference(config) -> fid.Statistics:
  return fid.load_statistics(reference_path(config))
