r"""Autoencoder latent datasets for latent flow-map training (MeanFlow / iMF / DiT, ImageNet 256).

MeanFlow, iMF and DiT train on SD-VAE latents of ImageNet center crops (Peebles & Xie 2023;
Geng et al. 2025). fmjax builds such a dataset itself from an image folder or a TFDS image
set and an fmjax autoencoder folder (fmjax.autoencoders):

  python -m fmjax.data.latents build --source=folder:/data/imagenet/train \
      --autoencoder=VAE_FOLDER --resolution=256 --split=train --data_dir=DATA_DIR
  python -m fmjax.data.latents build --source=tfds:mnist5k --tfds_split=train \
      --autoencoder=VAE_FOLDER --data_dir=DATA_DIR          # -> mnist5k_latents

An autoencoder of a kind registered outside fmjax (fmjax.autoencoders.register) loads once the
file that registers it has run: add --register=FILE (your experiment file, say).

Every image (a folder: ADM's center crop at --resolution, fmjax.data.image_folder; a TFDS
set: as stored, or ADM-cropped when --resolution differs) becomes x / 127.5 - 1 and is
encoded together with its horizontal flip. Each example stores the posterior `mean` and
`std` of the image and `mean_flip`, `std_flip` of its flip (float32 [h, w, c], NOT scaled),
its `label` and `source_index` (its position in the source's fixed order). Training draws
(mean + std * eps) * scaling_factor from a random one of the two per example and step
(fmjax.data.pipelines.ImageSource), as MeanFlow's reference code samples its cached moments.
The dataset NAME (default imagenet{resolution}_latents for a folder, {tfds name}_latents for
a TFDS set; a name must end in _latents) is ArrayRecord in DATA_DIR/NAME/1.0.0, with the
sidecar fmjax_latents.json (autoencoder digest and folder, scaling factor, source, crop,
resolution, latent shape, examples and skipped files per split; no timestamps).

Resumable: chunk k holds images [k * chunk, (k + 1) * chunk) of the fixed order and is
written atomically into DATA_DIR/NAME/1.0.0.fmjax_partial/SPLIT/ beside a manifest (source,
autoencoder digest, resolution, chunk and batch size, hash of the file list). Rerunning the
same command after an interruption (even kill -9) skips finished chunks and gives exactly
the dataset an uninterrupted run gives; a rerun with another autoencoder, resolution or
source is refused (or pass --overwrite). Unreadable images are reported by path, skipped,
kept in the chunk (so a resume skips the same ones) and listed in the sidecar. Peak disk use
is about twice the dataset (chunks, then the dataset; ImageNet 256 with SD-VAE: ~85 GB
each). One build at a time writes a dataset, on one process (it uses every local device): a
second build of the same NAME stops before writing, naming the process that holds the lock
(an flock on DATA_DIR/NAME/1.0.0.fmjax_lock, released when that process ends, kill -9 included).

Precomputed latents from elsewhere (the older `imagenet256_latents` format: one feature
`latent`, already scaled) still build from NumPy shards:

  latents = vae.encode(images).latent_dist.sample() * 0.18215     # [N, 4, 32, 32] (torch, NCHW)
  np.savez(f'shard_{i:05d}.npz', latents=latents.permute(0, 2, 3, 1).numpy(), labels=labels)
  python -m fmjax.data.latents --shards='/data/latents/train_*.npz' --split=train \
      --data_dir=~/tensorflow_datasets

Each shard holds `latents` float32 [N, 32, 32, 4] (channels last, already scaled) and
`labels` int [N] in [0, 1000). Both formats are read without TensorFlow by `tfds.data_source`.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import fcntl
import glob
import hashlib
import importlib
import json
import os
import shutil
import socket
import sys
import time

import numpy as np

from fmjax import user_files
from fmjax.data import image_folder, local_tfds

NAME, VERSION = 'imagenet256_latents', '1.0.0'
LATENT_SHAPE = (32, 32, 4)
NUM_CLASSES = 1000

SIDECAR = 'fmjax_latents.json'
FORMAT, FORMAT_VERSION = 'fmjax_latents', 1
LATENT_SUFFIX = '_latents'   # training recognizes latent datasets by their name's ending
PARTIAL_SUFFIX = '.fmjax_partial'
LOCK_SUFFIX = '.fmjax_lock'      # held (flock) by the build writing the dataset
MOMENTS = ('mean', 'std', 'mean_flip', 'std_flip')


def is_latent_dataset(name: str) -> bool:
  """Whether a dataset name (config.data.name) names autoencoder latents."""
  return name.endswith(LATENT_SUFFIX)


class BuildError(ValueError):
  """A build that cannot start or continue as asked; the message says what to do."""


# ----------------------------------------------------------------------------- shards (older format)


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


# ----------------------------------------------------------------------------- image sources


class _FolderImages:
  """root/<class>/<image>, ADM center crop at `resolution`, RGB."""

  def __init__(self, root: str, resolution: int | None, in_channels: int):
    if resolution is None:
      raise BuildError('A folder source needs --resolution (e.g. 256: ADM center crops of that size).')
    if in_channels != 3:
      raise BuildError(f'The autoencoder takes {in_channels}-channel images; a folder source gives RGB '
                       'crops (3 channels). Use an autoencoder with in_channels 3.')
    try:
      self._folder = image_folder.ImageFolderSource(root, resolution)
    except FileNotFoundError as err:
      raise BuildError(str(err)) from None
    self.spec = f'folder:{self._folder.root}'
    self.source_split = None
    self.num_images = len(self._folder)
    self.class_names = list(self._folder.class_names)
    self.num_classes = len(self.class_names)
    self.crop, self.resolution = image_folder.crop_name(resolution), int(resolution)
    self.image_shape = (self.resolution, self.resolution, 3)
    root_len = len(self._folder.root) + 1
    listing = '\n'.join(f'{label}\t{path[root_len:]}' for path, label in
                        zip(self._folder.paths, self._folder.labels))
    self.list_hash = hashlib.sha256(listing.encode()).hexdigest()

  def describe(self, index: int) -> str:
    return self._folder.paths[index]

  def read(self, index: int) -> tuple[np.ndarray, int]:
    example = self._folder[index]
    return example['image'], int(example['label'])


class _TfdsImages:
  """A prepared TFDS image set ('image' uint8 [H, W, 1 or 3], 'label'), in stored order."""

  def __init__(self, name: str, split: str, data_dir: str, resolution: int | None, in_channels: int):
    import tensorflow_datasets as tfds
    from fmjax.data import pipelines

    data_dir = pipelines.resolve_data_dir(data_dir)
    path = pipelines.prepared_version(os.path.join(data_dir, name))
    if path is None:
      how = pipelines.how_to_prepare(name, data_dir)
      raise BuildError(f"TFDS dataset '{name}' is not prepared in {data_dir} (looked for "
                       f'{data_dir}/{name}/<version>/dataset_info.json). '
                       + (f'Prepare it with:\n  {how}' if how else 'Pass --source_data_dir where it is.'))
    builder = tfds.builder_from_directory(path)
    if split not in builder.info.splits:
      raise BuildError(f'--tfds_split={split}: {name} has splits {sorted(builder.info.splits)}.')
    features = builder.info.features
    if 'image' not in features or 'label' not in features:
      raise BuildError(f"{name} has features {sorted(features)}; a TFDS source needs 'image' and 'label'.")
    height, width, channels = tuple(features['image'].shape)
    if channels not in (1, 3):
      raise BuildError(f'{name} images have {channels} channels; a TFDS source needs 1 or 3.')
    if channels == 3 and in_channels == 1:
      raise BuildError(f'{name} holds RGB images but the autoencoder takes 1 channel; use an '
                       'autoencoder with in_channels 3.')
    if in_channels not in (1, 3):
      raise BuildError(f'The autoencoder takes {in_channels}-channel images; only 1 or 3 are supported.')
    self._source = builder.as_data_source(split=split)
    self._channels, self._in_channels = channels, in_channels
    self.spec, self.source_split = f'tfds:{name}', split
    self.num_images = len(self._source)
    label = features['label']
    self.num_classes = int(label.num_classes)
    self.class_names = list(label.names)
    native = height is not None and height == width
    if resolution is None or (native and height == resolution):
      if height is None or width is None:
        raise BuildError(f'{name} images vary in size; pass --resolution to ADM-center-crop them.')
      self.crop, self.resolution = 'none', (int(height) if native else None)
      self.image_shape = (int(height), int(width), in_channels)
    else:
      self.crop, self.resolution = image_folder.crop_name(resolution), int(resolution)
      self.image_shape = (self.resolution, self.resolution, in_channels)
    listing = f'{name}\t{builder.info.version}\t{split}\t{self.num_images}'
    self.list_hash = hashlib.sha256(listing.encode()).hexdigest()

  def describe(self, index: int) -> str:
    return f'{self.spec}[{self.source_split}][{index}]'

  def read(self, index: int) -> tuple[np.ndarray, int]:
    example = self._source[int(index)]
    image = np.asarray(example['image'], np.uint8)
    if self.crop != 'none':
      from PIL import Image
      pil = Image.fromarray(image[..., 0], 'L') if self._channels == 1 else Image.fromarray(image, 'RGB')
      image = image_folder.center_crop_arr(pil, self.resolution)
      image = image[..., None] if image.ndim == 2 else image
    if self._channels == 1 and self._in_channels == 3:
      image = np.repeat(image, 3, axis=-1)    # grayscale replicated for an RGB autoencoder
    return image, int(example['label'])


def open_source(source: str, *, resolution: int | None, in_channels: int, data_dir: str,
                tfds_split: str = 'train'):
  """The image source named `folder:PATH` or `tfds:NAME`, checked against the autoencoder."""
  kind, _, where = source.partition(':')
  if kind == 'folder' and where:
    return _FolderImages(where, resolution, in_channels)
  if kind == 'tfds' and where:
    return _TfdsImages(where, tfds_split, data_dir, resolution, in_channels)
  raise BuildError(f'--source={source!r}: use folder:/path/to/imagenet/train (one folder per class) '
                   'or tfds:NAME (a prepared TFDS image set, with --tfds_split).')


# ----------------------------------------------------------------------------- files


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _write_atomic(path: str, write) -> None:
  """write(file) into path + '.tmp', fsync, rename over path: a reader sees all or nothing."""
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    write(f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  _fsync_dir(os.path.dirname(path))


def _write_json(path: str, value: dict) -> None:
  _write_atomic(path, lambda f: f.write((json.dumps(value, indent=1, sort_keys=True) + '\n').encode()))


def _read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_info(version_folder: str) -> dict | None:
  """The sidecar of a latent dataset version folder (None for other datasets)."""
  return _read_json(os.path.join(version_folder, SIDECAR))


def _chunk_path(work: str, k: int) -> str:
  return os.path.join(work, f'chunk_{k:06d}.npz')


# ----------------------------------------------------------------------------- encoding


def encode_with_flip(vae, images: np.ndarray) -> dict[str, np.ndarray]:
  """Posterior moments of uint8 images [N, H, W, C] and of their horizontal flips, one
  vae.encode call: {'mean', 'std', 'mean_flip', 'std_flip'} float32 [N, h, w, c]."""
  x = images.astype(np.float32) / 127.5 - 1.0
  mean, std = vae.encode(np.concatenate([x, x[:, :, ::-1]]))
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  n = len(x)
  return {'mean': mean[:n], 'std': std[:n], 'mean_flip': mean[n:], 'std_flip': std[n:]}


class _Progress:
  """`count/total, images/s, ETA` on stderr, at most every `every` seconds."""

  def __init__(self, total: int, done: int, log, every: float = 2.0):
    self.total, self.start_done, self.log, self.every = total, done, log, every
    self.start = self.last = time.monotonic()

  def rate(self, done: int) -> float:
    return (done - self.start_done) / max(time.monotonic() - self.start, 1e-9)

  def update(self, done: int) -> None:
    now = time.monotonic()
    if now - self.last < self.every:
      return
    self.last = now
    rate = self.rate(done)
    eta = (self.total - done) / rate if rate > 0 else float('inf')
    eta_text = f'{int(eta) // 3600}:{int(eta) // 60 % 60:02d}:{int(eta) % 60:02d}' if eta < 1e8 else '?'
    print(f'latents: {done:,}/{self.total:,} images ({100 * done / max(self.total, 1):.1f} %), '
          f'{rate:.1f} images/s, ETA {eta_text}', file=self.log, flush=True)


def _ordered_reads(read, indices, workers: int, lookahead: int):
  """read(i) for each index, in order, `workers` threads reading ahead (PIL decodes and
  resizes without the GIL, so threads keep the encoder fed)."""
  if workers <= 1:
    yield from map(read, indices)
    return
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    for index in indices:
      pending.append(pool.submit(read, index))
      if len(pending) >= lookahead:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


# ----------------------------------------------------------------------------- the builder


def _load_autoencoder(folder: str, loader: str | None):
  if loader:     # 'module:function' (tests pass a stand-in autoencoder this way)
    module, _, function = loader.partition(':')
    return getattr(importlib.import_module(module), function)(folder)
  from fmjax import autoencoders
  try:
    return autoencoders.load(folder)
  except (OSError, ValueError) as e:   # a damaged folder or an unregistered kind: one message
    hint = (' From the command line, --register=FILE first runs a Python file that registers '
            'it (your experiment file, say).' if isinstance(e, autoencoders.UnknownAutoencoderError) else '')
    raise BuildError(f'--autoencoder={folder}: {e}{hint}') from None


def _dataset_fields(vae, source, latent_shape) -> dict:
  """What every split of one dataset must share."""
  return {'format': FORMAT, 'format_version': FORMAT_VERSION,
          'autoencoder_digest': str(vae.digest), 'scaling_factor': float(vae.scaling_factor),
          'downsample_factor': int(vae.downsample_factor), 'in_channels': int(vae.config.in_channels),
          'crop': source.crop, 'resolution': source.resolution,
          'image_shape': list(source.image_shape), 'latent_shape': list(latent_shape),
          'num_classes': source.num_classes, 'class_names': source.class_names}


def _differences(old: dict, new: dict, keys) -> list[str]:
  short = lambda v: (r if len(r := repr(v)) <= 80 else r[:77] + '...')
  return [f'{k}: {short(old.get(k))} -> {short(new.get(k))}' for k in keys if old.get(k) != new.get(k)]


def _clean_up(partial: str, split: str) -> None:
  """Removes what a finished build of `split` leaves in the work folder."""
  for path in (os.path.join(partial, 'previous'), os.path.join(partial, 'tfds'),
               os.path.join(partial, split)):
    shutil.rmtree(path, ignore_errors=True)
  if os.path.isdir(partial) and not os.listdir(partial):
    os.rmdir(partial)


def _features(latent_shape, num_classes: int) -> dict:
  import tensorflow_datasets as tfds
  moment = lambda: tfds.features.Tensor(shape=tuple(latent_shape), dtype=np.float32)
  return {**{key: moment() for key in MOMENTS},
          'label': tfds.features.ClassLabel(num_classes=num_classes),
          'source_index': tfds.features.Tensor(shape=(), dtype=np.int64)}


@contextlib.contextmanager
def _exclusive_build(final: str, split: str, log):
  """Holds an exclusive lock on the dataset `final` while this build writes it.

  Two builds of one dataset (the same split twice, or two splits, which share the final swap)
  would interleave their chunks or undo each other's swap; the second one stops instead, before
  it writes anything. The lock is an flock on FINAL.fmjax_lock: the kernel releases it when the
  holding process ends in any way (kill -9 included), so a rerun after a crash never meets a
  stale lock. On a filesystem without flock the build goes on unlocked, with a warning.
  """
  lock_path = final + LOCK_SUFFIX
  os.makedirs(os.path.dirname(lock_path), exist_ok=True)
  fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise BuildError(f'Another build is writing {final} ({_lock_holder(fd)}); one build at a '
                       'time writes a latent dataset. Wait for it to finish (or stop it), then rerun '
                       'this command: it resumes from the finished chunks.') from None
    except OSError as e:     # e.g. a network filesystem without flock
      print(f'latents: warning: cannot lock {lock_path} ({e}); make sure no other build writes '
            f'{final} meanwhile.', file=log)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'split': split}).encode(), 0)
    yield
  finally:
    os.close(fd)             # releases the lock


def _lock_holder(fd: int) -> str:
  try:
    holder = json.loads(os.pread(fd, 4096, 0))
    return f"process {holder['pid']} on {holder['host']}, split {holder['split']!r}"
  except (ValueError, KeyError, TypeError):   # written by nothing yet, or cut short
    return 'its process not recorded'


def build_latents(source: str, autoencoder: str, *, data_dir: str, split: str = 'train',
                  resolution: int | None = None, name: str | None = None, batch_size: int = 64,
                  chunk: int = 1024, tfds_split: str = 'train', source_data_dir: str | None = None,
                  overwrite: bool = False, workers: int | None = None, vae=None, log=None,
                  _autoencoder_loader: str | None = None, _sleep_per_chunk: float = 0.0) -> str:
  """Builds split `split` of latent dataset NAME in data_dir (resumable); returns its
  version folder. `vae` (an already loaded autoencoder) skips loading `autoencoder`, which
  is then only recorded. See the module docstring for the format."""
  log = log or sys.stderr
  started = time.monotonic()
  data_dir = os.path.abspath(os.path.expanduser(data_dir))
  if resolution is not None and int(resolution) <= 0:
    raise BuildError(f'--resolution={resolution}: must be a positive number of pixels.')
  if batch_size <= 0 or chunk <= 0:
    raise BuildError(f'--batch_size={batch_size} and --chunk={chunk} must be positive.')
  autoencoder = os.path.abspath(os.path.expanduser(autoencoder))
  if vae is None:
    if not os.path.isdir(autoencoder):
      raise BuildError(f'--autoencoder={autoencoder} does not exist; pass a folder written by '
                       'fmjax.autoencoders.save.')
    vae = _load_autoencoder(autoencoder, _autoencoder_loader)
  src = open_source(source, resolution=resolution, in_channels=int(vae.config.in_channels),
                    data_dir=source_data_dir or data_dir, tfds_split=tfds_split)
  factor = int(vae.downsample_factor)
  height, width = src.image_shape[:2]
  if height % factor or width % factor:
    raise BuildError(f'Images of {height} x {width} are not a multiple of the autoencoder\'s '
                     f'downsampling factor {factor}; pass --resolution (a multiple of {factor}).')
  latent_shape = tuple(int(d) for d in vae.latent_shape(tuple(src.image_shape)))
  if name is None:
    name = (f'imagenet{src.resolution}{LATENT_SUFFIX}' if src.spec.startswith('folder:')
            else src.spec.partition(':')[2] + LATENT_SUFFIX)
  if not is_latent_dataset(name):
    raise BuildError(f'--name={name}: a latent dataset name must end in {LATENT_SUFFIX} (training '
                     'recognizes latent datasets by it).')

  final = os.path.join(data_dir, name, VERSION)
  with _exclusive_build(final, split, log):
    partial = final + PARTIAL_SUFFIX
    previous = os.path.join(partial, 'previous')
    if not os.path.isdir(final) and os.path.isdir(previous):
      os.replace(previous, final)          # killed between the two renames of the last swap
    fields = _dataset_fields(vae, src, latent_shape)
    split_fields = {'source': src.spec, 'source_split': src.source_split, 'num_images': src.num_images,
                    'list_hash': src.list_hash}

    # What the existing dataset (if any) keeps.
    keep_splits: dict[str, dict] = {}
    if os.path.isdir(final):
      info = read_info(final)
      if info is None:
        if not overwrite:
          raise BuildError(f'{final} holds a dataset not built by this command (no {SIDECAR}, e.g. '
                           'from --shards); pass another --name, or --overwrite to replace it.')
        print(f'latents: --overwrite: replacing {final}', file=log)
      else:
        changed = _differences(info, fields, [k for k in fields if k != 'format'])
        if changed and not overwrite:
          raise BuildError(f'{final} was built with other settings ({"; ".join(changed)}) for splits '
                           f'{sorted(info["splits"])}; pass another --name, or --overwrite to rebuild '
                           'it (dropping those splits).')
        old = info['splits'].get(split)
        if not changed and old is not None and not overwrite:
          diff = _differences(old, split_fields, split_fields)
          if diff:
            raise BuildError(f'Split {split!r} of {final} was built from another source '
                             f'({"; ".join(diff)}); pass another --split, or --overwrite to replace it.')
          _clean_up(partial, split)     # left by a run killed after its last rename
          print(f'latents: {name}/{split} is already built in {final} ({old["num_examples"]} examples).',
                file=log)
          return final
        if not changed:
          keep_splits = {s: v for s, v in info['splits'].items() if s != split}
        elif overwrite:
          print(f'latents: --overwrite: dropping splits {sorted(info["splits"])} of {final} '
                f'({"; ".join(changed)})', file=log)

    # The work folder of this split and its manifest.
    work = os.path.join(partial, split)
    manifest = {**{k: v for k, v in fields.items() if k != 'class_names'}, **split_fields,
                'name': name, 'split': split, 'chunk': chunk, 'batch_size': batch_size}
    recorded = _read_json(os.path.join(work, 'manifest.json'))
    if recorded is not None and recorded != manifest:
      diff = _differences(recorded, manifest, sorted(set(recorded) | set(manifest)))
      if not overwrite:
        raise BuildError(f'{work} holds an unfinished build with other settings ({"; ".join(diff)}); '
                         'rerun with those settings to resume it, or pass --overwrite to start over.')
      print(f'latents: --overwrite: discarding the unfinished build in {work}', file=log)
      shutil.rmtree(work)
      recorded = None
    os.makedirs(work, exist_ok=True)
    if recorded is None:
      _write_json(os.path.join(work, 'manifest.json'), manifest)
    for stale in os.listdir(work):
      if stale.endswith('.tmp'):           # a write that a kill interrupted
        os.remove(os.path.join(work, stale))

    _encode_chunks(vae, src, work, latent_shape, batch_size=batch_size, chunk=chunk,
                   workers=workers if workers is not None else min(32, os.cpu_count() or 1),
                   log=log, sleep_per_chunk=_sleep_per_chunk)
    skipped, num_examples = _assemble(name, final, partial, work, split, fields, split_fields,
                                      keep_splits, latent_shape, src.num_classes, autoencoder,
                                      -(-src.num_images // chunk))
    print(f'latents: {name}/{split}: {num_examples:,} examples from {src.num_images:,} images, '
          f'{len(skipped)} unreadable image(s) skipped{" (listed in " + SIDECAR + ")" if skipped else ""}; '
          f'{time.monotonic() - started:.1f} s. Ready in {final}; train with '
          f'--config.data.name={name} --config.data.data_dir={data_dir}', file=log, flush=True)
    return final


def _encode_chunks(vae, src, work: str, latent_shape, *, batch_size: int, chunk: int, workers: int,
                   log, sleep_per_chunk: float) -> None:
  """Writes every missing chunk file of `work`."""
  num_chunks = -(-src.num_images // chunk)
  bounds = [(k, k * chunk, min((k + 1) * chunk, src.num_images)) for k in range(num_chunks)]
  todo = [b for b in bounds if not os.path.exists(_chunk_path(work, b[0]))]
  done = src.num_images - sum(stop - start for _, start, stop in todo)
  if done:
    print(f'latents: resuming: {num_chunks - len(todo)} of {num_chunks} chunks already in {work}',
          file=log, flush=True)
  progress = _Progress(src.num_images, done, log)

  def read(index):
    try:
      image, label = src.read(index)
      return index, image, label, None
    except image_folder.UnreadableImageError as err:
      return index, None, None, err.reason

  reads = _ordered_reads(read, (i for _, start, stop in todo for i in range(start, stop)),
                         workers, lookahead=2 * batch_size + 4 * workers)
  empty = np.zeros((0,) + tuple(latent_shape), np.float32)
  for k, start, stop in todo:
    moments = {key: [empty] for key in MOMENTS}
    labels, kept, skipped_index, skipped_error = [], [], [], []
    batch, batch_labels, batch_index = [], [], []

    def flush():
      if not batch:
        return
      out = encode_with_flip(vae, np.stack(batch))
      for key in MOMENTS:
        if out[key].shape[1:] != tuple(latent_shape):
          raise RuntimeError(f'The autoencoder returned {key} of shape {out[key].shape}, expected '
                             f'[N, {", ".join(map(str, latent_shape))}].')
        moments[key].append(out[key])
      labels.extend(batch_labels)
      kept.extend(batch_index)
      for pending in (batch, batch_labels, batch_index):
        pending.clear()

    for _ in range(start, stop):
      index, image, label, error = next(reads)
      if error is not None:
        print(f'latents: skipping unreadable image {src.describe(index)}: {error}', file=log, flush=True)
        skipped_index.append(index)
        skipped_error.append(error)
      else:
        if image.shape != tuple(src.image_shape):
          raise RuntimeError(f'{src.describe(index)}: image of shape {image.shape}, expected '
                             f'{tuple(src.image_shape)}.')
        batch.append(image)
        batch_labels.append(label)
        batch_index.append(index)
        if len(batch) == batch_size:
          flush()
      done += 1
      progress.update(done)
    flush()
    arrays = {key: np.concatenate(parts) for key, parts in moments.items()}
    arrays.update(label=np.asarray(labels, np.int64), source_index=np.asarray(kept, np.int64),
                  skipped_index=np.asarray(skipped_index, np.int64),
                  skipped_path=np.asarray([src.describe(i) for i in skipped_index], dtype=str),
                  skipped_error=np.asarray(skipped_error, dtype=str))
    _write_atomic(_chunk_path(work, k), lambda f: np.savez(f, **arrays))
    if sleep_per_chunk:
      time.sleep(sleep_per_chunk)      # tests: leaves time to kill a build between chunks
  if todo:
    rate = progress.rate(done)
    print(f'latents: encoded {done - progress.start_done:,} images ({rate:.1f} images/s)', file=log,
          flush=True)


def _assemble(name, final, partial, work, split, fields, split_fields, keep_splits, latent_shape,
              num_classes, autoencoder, num_chunks) -> tuple[list[tuple[str, str]], int]:
  """The TFDS dataset of the kept splits plus this split's chunks, swapped in for `final`."""
  import tensorflow_datasets as tfds

  chunk_files = [_chunk_path(work, k) for k in range(num_chunks)]
  skipped, num_examples = [], 0
  for path in chunk_files:
    with np.load(path) as f:
      num_examples += len(f['label'])
      skipped.extend((str(p), str(e)) for p, e in zip(f['skipped_path'], f['skipped_error']))

  def from_chunks():
    for path in chunk_files:
      with np.load(path) as f:
        arrays = {key: f[key] for key in (*MOMENTS, 'label', 'source_index')}
      for i, index in enumerate(arrays['source_index']):
        example = {key: arrays[key][i] for key in MOMENTS}
        example.update(label=int(arrays['label'][i]), source_index=int(index))
        yield int(index), example

  def from_existing(split_name):
    def examples():
      source = tfds.builder_from_directory(final).as_data_source(split=split_name)
      for i in range(len(source)):
        example = source[i]
        yield int(example['source_index']), {k: example[k] for k in (*MOMENTS, 'label', 'source_index')}
    return examples

  staging = os.path.join(partial, 'tfds')
  shutil.rmtree(staging, ignore_errors=True)     # a half-written one from a killed run
  splits = {s: from_existing(s) for s in keep_splits}
  splits[split] = from_chunks
  description = (f'Autoencoder latents (digest {fields["autoencoder_digest"]}) of {split_fields["source"]}: '
                 'posterior mean and std of each image and of its horizontal flip, unscaled '
                 '(fmjax.data.latents).')
  built = local_tfds.build(name, VERSION, staging, description,
                           _features(latent_shape, num_classes), splits)
  info = dict(fields)
  info['autoencoder_folder'] = autoencoder
  info['splits'] = {**keep_splits, split: {**split_fields, 'num_examples': num_examples,
                                           'skipped': [path for path, _ in skipped],
                                           'skipped_errors': [error for _, error in skipped]}}
  info['num_examples'] = {s: v['num_examples'] for s, v in info['splits'].items()}
  info['skipped'] = [path for s in sorted(info['splits']) for path in info['splits'][s]['skipped']]
  info['features'] = {
      'mean': 'float32 [h, w, c]: posterior mean of the image, not scaled',
      'std': 'float32 [h, w, c]: posterior std of the image, not scaled',
      'mean_flip': 'float32 [h, w, c]: posterior mean of the horizontally flipped image',
      'std_flip': 'float32 [h, w, c]: posterior std of the horizontally flipped image',
      'label': 'class id', 'source_index': "position in the source's fixed order"}
  _write_json(os.path.join(built, SIDECAR), info)
  # Swap: the old version (if any) moves into the work folder first, so a kill between the two
  # renames is repaired by the next run (which moves it back and assembles again).
  previous = os.path.join(partial, 'previous')
  shutil.rmtree(previous, ignore_errors=True)
  if os.path.isdir(final):
    os.replace(final, previous)
  os.makedirs(os.path.dirname(final), exist_ok=True)
  os.replace(built, final)
  _fsync_dir(os.path.dirname(final))
  _clean_up(partial, split)
  return skipped, num_examples


def run_registration_file(path: str) -> None:
  """Runs the Python file `path` (the build command's --register=FILE): a file that calls
  fmjax.autoencoders.register, such as an experiment file, so that the build loads an
  autoencoder kind defined outside fmjax. Raises BuildError naming the file, the line and the
  error when the file is missing or raises."""
  if not os.path.isfile(path):
    raise BuildError(f'--register={path}: no such file; pass the Python file that calls '
                     'fmjax.autoencoders.register(CLASS_NAME, loader).')
  try:
    user_files.run(path, 'fmjax_registration')
  except Exception as e:   # whatever the user's file raises: say where, once
    raise BuildError(f'--register={path}: the file raised an error: '
                     f'{user_files.describe_error(path, e)}') from None


# ----------------------------------------------------------------------------- command line


def _build_main(argv) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m fmjax.data.latents build',
      description='Encode an image folder or TFDS image set into a latent dataset (resumable).')
  parser.add_argument('--source', required=True, help='folder:/path/to/train (root/<class>/<image>) or tfds:NAME')
  parser.add_argument('--autoencoder', required=True, help='folder written by fmjax.autoencoders.save')
  parser.add_argument('--resolution', type=int, default=None,
                      help='ADM center crop size (required for folders; TFDS: crop when it differs)')
  parser.add_argument('--name', default=None, help='dataset name ending in _latents (default: '
                      'imagenet{resolution}_latents for a folder, {tfds name}_latents for TFDS)')
  parser.add_argument('--split', default='train', help='split of the latent dataset to write')
  parser.add_argument('--data_dir', default=os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))
  parser.add_argument('--tfds_split', default='train', help='TFDS source: the split to read')
  parser.add_argument('--source_data_dir', default=None, help='TFDS source: where it is (default --data_dir)')
  parser.add_argument('--batch_size', type=int, default=64, help='images per encoder call (each with its flip)')
  parser.add_argument('--chunk', type=int, default=1024, help='images per resumable chunk')
  parser.add_argument('--workers', type=int, default=None, help='image reading threads (default: CPUs, at most 32)')
  parser.add_argument('--overwrite', action='store_true',
                      help='discard an unfinished build or existing data made with other settings')
  parser.add_argument('--register', action='append', default=[], metavar='FILE',
                      help='a Python file run before the autoencoder loads, which registers its kind '
                           '(fmjax.autoencoders.register); repeatable')
  parser.add_argument('--_autoencoder_loader', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--_sleep_per_chunk', type=float, default=0.0, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  try:
    for path in args.register:
      run_registration_file(path)
    build_latents(args.source, args.autoencoder, data_dir=args.data_dir, split=args.split,
                  resolution=args.resolution, name=args.name, batch_size=args.batch_size,
                  chunk=args.chunk, tfds_split=args.tfds_split, source_data_dir=args.source_data_dir,
                  overwrite=args.overwrite, workers=args.workers,
                  _autoencoder_loader=args._autoencoder_loader, _sleep_per_chunk=args._sleep_per_chunk)
  except BuildError as err:
    sys.exit(f'python -m fmjax.data.latents build: {err}')


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ['build']:
    return _build_main(argv[1:])
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--shards', required=True, help='glob of .npz shards (or use the `build` command)')
  parser.add_argument('--split', default='train')
  parser.add_argument('--data_dir', default=os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))
  args = parser.parse_args(argv)
  path = build(glob.glob(os.path.expanduser(args.shards)), args.split, args.data_dir)
  print(f'{NAME} ({args.split}) ready in {path}; train with --config.data.data_dir={os.path.expanduser(args.data_dir)}')


if __name__ == '__main__':
  main()
