"""Training batches as global jax.Arrays: toy targets on device, datasets through grain.

Which names exist, and how a dataset is found and opened (TFDS folders, registered arrays), is
fmjax.data.datasets; this module turns them into batches.

Every source offers the same small interface to the training loop:
  batch(step) -> {'x1': global array [B, ...], 'labels': int32 [B] (class-conditional only)}
  get_state() / set_state(state)   a JSON-able iterator state stored with each checkpoint
  example_shape, num_classes       what the network is built for
Batches depend only on (seed, step) and the dataset, never on the number of devices or
processes, so a run resumed from a checkpoint, or moved to another mesh, sees the same data.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from fmjax import sharding as sharding_lib
from fmjax.data import datasets, latents, toy


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

# The names, and how each is found and opened, live in fmjax.data.datasets; these are the same
# objects under their old names here.
DatasetNotFoundError = datasets.DatasetNotFoundError
how_to_prepare = datasets.how_to_prepare
resolve_data_dir = datasets.resolve_data_dir
prepared_version = datasets.prepared_version
find_prepared = datasets.find_prepared


def latent_info(path: str | None, features) -> dict | None:
  """The fmjax.data.latents sidecar of a prepared version folder holding latent moments
  (None for pixel sets and pre-scaled `latent` sets); a moments set without it is an error."""
  if 'mean' not in features or path is None:
    return None
  info = latents.read_info(path)
  if info is None:
    raise DatasetNotFoundError(
        f'{path} holds latent moments but not their {latents.SIDECAR} (the scaling factor and '
        'autoencoder); rebuild it with python -m fmjax.data.latents build.')
  return info


def _normalize_images(example: dict, num_classes: int) -> dict:
  """uint8 images in [0, 255] -> float32 in [-1, 1]; pre-scaled latents pass through as float32."""
  image = example['image'] if 'image' in example else example['latent']
  if image.dtype == np.uint8:
    x1 = image.astype(np.float32) / 127.5 - 1.0
  else:
    x1 = image.astype(np.float32)
  out = {'x1': x1}
  if num_classes:
    out['labels'] = np.int32(example['label'])
  return out


def _draw_latent(example: dict, rng: np.random.Generator, scaling_factor: float, num_classes: int) -> dict:
  """One latent from stored posterior moments: (mean + std * eps) * scaling_factor, eps ~ N(0, I),
  from the image or (probability 1/2) its horizontal flip, as MeanFlow's reference code samples
  its cached moments (a new draw every time the example is read)."""
  suffix = '_flip' if rng.random() < 0.5 else ''
  mean, std = example['mean' + suffix], example['std' + suffix]
  eps = rng.standard_normal(mean.shape, dtype=np.float32)
  out = {'x1': ((mean + std * eps) * np.float32(scaling_factor)).astype(np.float32)}
  if num_classes:
    out['labels'] = np.int32(example['label'])
  return out


class ImageSource:
  """A dataset of fmjax.data.datasets -> grain -> global arrays: a prepared TFDS set read TF-free
  (`tfds.data_source`, ArrayRecord), or arrays / a random-access source registered in memory.

  The grain pipeline is a random-access MapDataset: shuffled with a seed, reshuffled every
  epoch, and sliced so that process i reads elements i, i + P, i + 2P, ... Its iterator state
  is one integer, the same on every process, so it is stored with the checkpoint and resumes
  exactly (also on another number of processes with the same global batch).

  Latent-moment sets (fmjax.data.latents build) give x1 = (mean + std * eps) * scaling_factor,
  drawn anew every read from the image's moments or its flip's (1/2 each) by grain's per-element
  seeded random map, so a draw is a function of (seed, position in the stream); `latent_info`
  is their sidecar (autoencoder digest and folder, scaling factor, crop; None for other sets).
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh):
    import grain

    data = config.data
    opened = datasets.open_split(data.name, data.data_dir, data.split)
    datasets.check_num_classes(opened, data.num_classes)   # before any batch is read
    # Small sets are decoded once (an ArrayRecord read decodes in Python: ~25 batches of 128 per
    # second, slower than a small model's GPU step); the batches are the same numbers either way.
    source = datasets.in_memory(opened.source, float(data.get('in_memory_gib', 0.0)) * 2**30)
    self.in_memory = isinstance(source, datasets.StackedExamples)
    self.num_examples = len(source)
    self.num_classes = data.num_classes
    self.mesh = mesh
    self.batch_size = config.train.batch_size
    local = sharding_lib.local_batch_size(self.batch_size)
    self.example_shape = opened.example_shape
    # The fmjax.data.latents sidecar (autoencoder digest and folder, scaling_factor, crop, ...)
    # of a latent-moments set; None for pixel sets and pre-scaled `latent` sets.
    self.latent_info = latent_info(opened.path, opened.features)
    num_classes = self.num_classes
    ds = (grain.MapDataset.source(source)
          .shuffle(seed=data.shuffle_seed)
          .repeat(None))
    if self.latent_info is None:
      ds = ds[jax.process_index()::jax.process_count()].map(lambda ex: _normalize_images(ex, num_classes))
    else:
      scale = float(self.latent_info['scaling_factor'])
      # Drawn before the split over processes: element n of the global stream gets the
      # generator of (seed, n), so a draw depends on neither the process count nor a restart.
      seed = int(np.random.SeedSequence([config.seed, data.shuffle_seed, 0x1A7E]).generate_state(1)[0])
      ds = (ds.random_map(lambda ex, rng: _draw_latent(ex, rng, scale, num_classes), seed=seed)
            [jax.process_index()::jax.process_count()])
    ds = ds.batch(local, drop_remainder=True)
    self._dataset = ds
    self._iterator = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=int(data.get('read_threads', 4)))))

  def batch(self, step: int) -> dict:
    del step     # the iterator state, checkpointed, is the position in the stream
    return sharding_lib.to_global(next(self._iterator), self.mesh)

  def get_state(self) -> dict:
    return dict(self._iterator.get_state())

  def set_state(self, state: dict) -> None:
    if state:
      self._iterator.set_state(state)


def make_source(config: ml_collections.ConfigDict, mesh):
  """The batch source of config.data.name: a toy target, or a dataset of fmjax.data.datasets."""
  if datasets.is_toy(config.data.name):
    return ToySource(config, mesh)
  return ImageSource(config, mesh)


def example_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The shape of one data point, without reading data (for fmjax.load)."""
  if datasets.is_toy(config.data.name):
    return (make_toy_target(config.data).dim,)
  return datasets.describe(config.data.name, config.data.data_dir, config.data.split)[0]
