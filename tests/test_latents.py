"""Latent datasets: the older pre-scaled shard format; the resumable builder (`python -m
fmjax.data.latents build`) against direct encoding of each ADM crop and its flip, its sidecar,
skipped corrupt files, kill -9 and resume giving the same dataset bit for bit, refusals; and
the training pipeline's draw (mean + std * eps) * scale with a random flip per example."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from PIL import Image

from fmjax import configs, sharding
from fmjax.data import image_folder, latents, local_tfds, pipelines

RES = 32          # crop size of the test images
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


# ----------------------------------------------------------------------------- older shard format


def test_latent_shards_become_a_dataset_the_pipelines_find_and_read(tmp_path):
  import tensorflow_datasets as tfds
  rng = np.random.default_rng(0)
  arrays = []
  for i in range(2):
    lat = rng.normal(size=(3, 32, 32, 4)).astype(np.float32)
    lab = rng.integers(0, 1000, size=3)
    np.savez(tmp_path / f'shard_{i}.npz', latents=lat, labels=lab)
    arrays.append((lat, lab))
  data_dir = tmp_path / 'tfds'
  latents.build([str(tmp_path / f'shard_{i}.npz') for i in range(2)], 'train', str(data_dir))
  assert pipelines.find_prepared('imagenet256_latents', str(data_dir)).endswith('1.0.0')
  source = tfds.data_source('imagenet256_latents', data_dir=str(data_dir), split='train')
  assert len(source) == 6
  expected = {float(l[0, 0, 0]): int(y) for lat, lab in arrays for l, y in zip(lat, lab)}
  got = {float(source[i]['latent'][0, 0, 0]): int(source[i]['label']) for i in range(6)}
  assert got == expected
  # The training pipeline reads them as they are (already scaled), with no sidecar.
  config = _config(str(data_dir), 'imagenet256_latents', batch_size=6)
  image_source = pipelines.ImageSource(config, sharding.make_mesh())
  assert image_source.latent_info is None and image_source.example_shape == (32, 32, 4)
  batch = np.asarray(image_source.batch(0)['x1'])
  assert sorted(batch[:, 0, 0, 0].tolist()) == sorted(expected)
  assert pipelines.example_shape(config) == (32, 32, 4)


def test_bad_shards_say_what_a_shard_must_hold(tmp_path):
  np.savez(tmp_path / 'nchw.npz', latents=np.zeros((2, 4, 32, 32), np.float32), labels=np.zeros(2))
  with pytest.raises(ValueError, match='channels first'):
    latents.read_shard(str(tmp_path / 'nchw.npz'))
  np.savez(tmp_path / 'nolabels.npz', latents=np.zeros((2, 32, 32, 4), np.float32))
  with pytest.raises(ValueError, match='labels'):
    latents.read_shard(str(tmp_path / 'nolabels.npz'))
  with pytest.raises(pipelines.DatasetNotFoundError, match='fmjax.data.latents'):
    pipelines.find_prepared('imagenet256_latents', str(tmp_path / 'empty'))


# ----------------------------------------------------------------------------- a stand-in autoencoder


class FakeVAE:
  """fmjax.autoencoders' interface in NumPy: average pooling by `factor`, fixed random channel
  maps; the mean adds a running sum along the width, so the moments of a flipped image are not
  the flipped moments, and the std varies with the image."""

  def __init__(self, folder):
    with open(os.path.join(folder, 'fake_vae.json')) as f:
      spec = json.load(f)
    self.downsample_factor = spec['factor']
    self.scaling_factor = spec['scaling_factor']
    self.config = types.SimpleNamespace(in_channels=spec['in_channels'])
    self.digest = 'fake:' + hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    rng = np.random.default_rng(spec['seed'])
    self._w_mean = rng.normal(size=(spec['in_channels'], spec['latent_channels'])).astype(np.float32)
    self._w_std = rng.normal(size=(spec['in_channels'], spec['latent_channels'])).astype(np.float32)
    self._latent_channels = spec['latent_channels']

  def latent_shape(self, shape):
    h, w, c = shape
    assert c == self.config.in_channels
    return (h // self.downsample_factor, w // self.downsample_factor, self._latent_channels)

  def encode(self, images):
    images = np.asarray(images)
    assert images.dtype == np.float32 and images.shape[-1] == self.config.in_channels
    assert images.min() >= -1 and images.max() <= 1
    n, h, w, c = images.shape
    f = self.downsample_factor
    pooled = images.reshape(n, h // f, f, w // f, f, c).mean(axis=(2, 4))
    mean = pooled @ self._w_mean + 0.5 * np.cumsum(pooled[..., :1], axis=2)
    std = 0.05 + 0.5 * np.exp(0.3 * (pooled @ self._w_std))
    return mean.astype(np.float32), std.astype(np.float32)


def load_fake_vae(folder):
  return FakeVAE(folder)


def _write_fake_vae(folder, seed=0, in_channels=3, factor=4, scaling_factor=0.5):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'fake_vae.json'), 'w') as f:
    json.dump({'seed': seed, 'in_channels': in_channels, 'factor': factor, 'latent_channels': 4,
               'scaling_factor': scaling_factor}, f)
  return str(folder)


CLASSES = ('n01', 'n02', 'n03')


def _write_folder(root, per_class=8):
  """Generated JPEGs (sizes around 64 x 64, some not square) in 3 classes, one corrupt."""
  rng = np.random.default_rng(1)
  for label, name in enumerate(CLASSES):
    os.makedirs(root / name)
    for i in range(per_class):
      width, height = 64 + 8 * (i % 3), 64 + 6 * (i % 2)
      yy, xx = np.mgrid[0:height, 0:width] / 64
      phase = rng.uniform(0, 2 * np.pi, 3)
      pixels = 127.5 + 110 * np.sin(2 * np.pi * (xx * (label + 1) + yy * rng.uniform(0.5, 2))[..., None] + phase)
      Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name / f'{name}_{i:02d}.JPEG',
                                                                 quality=90)
  corrupt = root / CLASSES[1] / f'{CLASSES[1]}_03_broken.JPEG'
  corrupt.write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  return str(corrupt)


def _records(version_folder, split='train'):
  import tensorflow_datasets as tfds
  source = tfds.builder_from_directory(version_folder).as_data_source(split=split)
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('latents')
  folder = tmp / 'imagenet' / 'train'
  corrupt = _write_folder(folder)
  vae_dir = _write_fake_vae(tmp / 'vae')
  data_dir = str(tmp / 'tfds')
  log = io.StringIO()
  path = latents.build_latents(f'folder:{folder}', vae_dir, data_dir=data_dir, resolution=RES,
                               batch_size=3, chunk=4, vae=load_fake_vae(vae_dir), log=log)
  return {'tmp': tmp, 'folder': str(folder), 'corrupt': corrupt, 'vae_dir': vae_dir,
          'data_dir': data_dir, 'path': path, 'log': log.getvalue()}


# ----------------------------------------------------------------------------- the builder


def test_builder_stores_the_moments_of_each_crop_and_of_its_flip(built):
  assert built['path'] == os.path.join(built['data_dir'], f'imagenet{RES}_latents', '1.0.0')
  paths, labels, _ = image_folder.list_images(built['folder'])
  records = _records(built['path'])
  assert len(records) == len(paths) - 1
  indices = sorted(int(r['source_index']) for r in records)
  assert [paths[i] for i in indices] == [p for p in paths if p != built['corrupt']]
  vae = load_fake_vae(built['vae_dir'])
  for record in records:
    i = int(record['source_index'])
    assert int(record['label']) == labels[i]
    image = image_folder.read_image(paths[i], RES)
    x = image[None].astype(np.float32) / 127.5 - 1
    mean, std = vae.encode(x)
    mean_flip, std_flip = vae.encode(np.ascontiguousarray(x[:, :, ::-1]))
    for key, want in (('mean', mean), ('std', std), ('mean_flip', mean_flip), ('std_flip', std_flip)):
      assert record[key].shape == (RES // 4, RES // 4, 4) and record[key].dtype == np.float32
      np.testing.assert_allclose(record[key], want[0], rtol=1e-6, atol=1e-6, err_msg=key)


def test_sidecar_and_the_skipped_corrupt_file(built):
  info = latents.read_info(built['path'])
  vae = load_fake_vae(built['vae_dir'])
  n = 3 * 8
  assert info['format_version'] == latents.FORMAT_VERSION
  assert info['autoencoder_digest'] == vae.digest and info['autoencoder_folder'] == built['vae_dir']
  assert info['scaling_factor'] == 0.5 and info['crop'] == f'adm_center_crop_{RES}'
  assert info['resolution'] == RES and info['latent_shape'] == [RES // 4, RES // 4, 4]
  assert info['num_examples'] == {'train': n} and info['class_names'] == list(CLASSES)
  split = info['splits']['train']
  assert split['source'] == f"folder:{built['folder']}" and split['num_images'] == n + 1
  assert info['skipped'] == [built['corrupt']]
  assert split['skipped'] == [built['corrupt']]
  assert 'Error' in split['skipped_errors'][0]      # PIL's reason, e.g. 'OSError: ...'
  # Reported as it happened, and counted at the end.
  assert f"skipping unreadable image {built['corrupt']}" in built['log']
  assert '1 unreadable image(s) skipped' in built['log']
  # The work folder is gone; a rerun of the same command does nothing.
  assert not os.path.exists(built['path'] + latents.PARTIAL_SUFFIX)
  log = io.StringIO()
  latents.build_latents(f"folder:{built['folder']}", built['vae_dir'], data_dir=built['data_dir'],
                        resolution=RES, batch_size=3, chunk=4, vae=vae, log=log)
  assert 'already built' in log.getvalue()


def _cli(built, data_dir, *extra):
  return [sys.executable, '-m', 'fmjax.data.latents', 'build', f"--source=folder:{built['folder']}",
          f"--autoencoder={built['vae_dir']}", f'--resolution={RES}', '--batch_size=3', '--chunk=4',
          f'--data_dir={data_dir}', '--workers=2', '--_autoencoder_loader=test_latents:load_fake_vae', *extra]


def _env():
  return {**os.environ, 'PYTHONPATH': os.pathsep.join([TESTS, ROOT, os.environ.get('PYTHONPATH', '')])}


def test_kill_9_then_rerun_gives_the_uninterrupted_dataset_bitwise(built, tmp_path):
  data_dir = str(tmp_path / 'tfds')
  work = os.path.join(data_dir, f'imagenet{RES}_latents', '1.0.0' + latents.PARTIAL_SUFFIX, 'train')
  proc = subprocess.Popen(_cli(built, data_dir, '--_sleep_per_chunk=1.0'), env=_env(), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  second = os.path.join(work, 'chunk_000001.npz')
  deadline = time.monotonic() + 60
  while not os.path.exists(second) and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.02)
  still_running = proc.poll() is None
  # Meanwhile a second build of the same dataset (another split shares its final swap) stops
  # before writing anything, naming the build that holds it.
  final = os.path.join(data_dir, f'imagenet{RES}_latents', '1.0.0')
  with pytest.raises(latents.BuildError, match=rf"Another build is writing {final} \(process "
                                               rf"{proc.pid} on .*, split 'train'\).*rerun"):
    latents.build_latents(f'folder:{built["folder"]}', built['vae_dir'], data_dir=data_dir, split='val',
                          resolution=RES, batch_size=3, chunk=4, vae=load_fake_vae(built['vae_dir']),
                          log=io.StringIO())
  assert not os.path.exists(os.path.join(os.path.dirname(work), 'val'))
  proc.send_signal(signal.SIGKILL)
  output = proc.communicate()[0].decode()
  assert still_running, output
  assert os.path.exists(second) and not os.path.exists(os.path.join(work, 'chunk_000006.npz'))
  assert not os.path.exists(os.path.join(data_dir, f'imagenet{RES}_latents', '1.0.0'))

  with open(os.path.join(work, 'chunk_000002.npz.tmp'), 'wb') as f:   # as if killed mid-write
    f.write(b'half a chunk')
  rerun = subprocess.run(_cli(built, data_dir), env=_env(), cwd=ROOT, capture_output=True, text=True)
  assert rerun.returncode == 0, rerun.stderr
  assert 'resuming: 2 of 7 chunks' in rerun.stderr or 'resuming: 3 of 7 chunks' in rerun.stderr, rerun.stderr
  resumed = os.path.join(data_dir, f'imagenet{RES}_latents', '1.0.0')
  assert latents.read_info(resumed) == latents.read_info(built['path'])
  got, want = _records(resumed), _records(built['path'])
  assert len(got) == len(want)
  for a, b in zip(got, want):
    assert a.keys() == b.keys()
    for key in a:
      assert np.asarray(a[key]).tobytes() == np.asarray(b[key]).tobytes(), key


class _Interrupt(Exception):
  pass


def test_an_unfinished_or_finished_build_refuses_another_autoencoder(built, tmp_path):
  other = load_fake_vae(_write_fake_vae(tmp_path / 'other_vae', seed=1))
  data_dir = str(tmp_path / 'tfds')
  args = dict(data_dir=data_dir, resolution=RES, batch_size=3, chunk=4, log=io.StringIO())
  source = f"folder:{built['folder']}"
  vae = load_fake_vae(built['vae_dir'])

  class Crashing(FakeVAE):   # dies in the second chunk, leaving the first behind
    calls = 0

    def encode(self, images):
      Crashing.calls += 1
      if Crashing.calls > 2:
        raise _Interrupt
      return super().encode(images)

  with pytest.raises(_Interrupt):
    latents.build_latents(source, built['vae_dir'], vae=Crashing(built['vae_dir']), **args)
  with pytest.raises(latents.BuildError, match='unfinished build with other settings.*autoencoder_digest'):
    latents.build_latents(source, 'other', vae=other, **args)
  elsewhere = tmp_path / 'elsewhere'
  os.makedirs(elsewhere / CLASSES[0])
  Image.open(os.path.join(built['folder'], CLASSES[0], f'{CLASSES[0]}_00.JPEG')).save(elsewhere / CLASSES[0] / 'a.png')
  with pytest.raises(latents.BuildError, match='source'):
    latents.build_latents(f'folder:{elsewhere}', built['vae_dir'], vae=vae,
                          **{**args, 'name': f'imagenet{RES}_latents'})
  with pytest.raises(latents.BuildError, match='resolution'):
    latents.build_latents(source, built['vae_dir'], vae=vae, **{**args, 'resolution': 16,
                                                               'name': f'imagenet{RES}_latents'})
  path = latents.build_latents(source, built['vae_dir'], vae=vae, **args)     # resumes
  assert [r['mean'].tobytes() for r in _records(path)] == [r['mean'].tobytes() for r in _records(built['path'])]
  with pytest.raises(latents.BuildError, match='--overwrite'):
    latents.build_latents(source, 'other', vae=other, **args)
  latents.build_latents(source, 'other', vae=other, overwrite=True, **args)
  assert latents.read_info(path)['autoencoder_digest'] == other.digest


def test_a_second_split_joins_the_dataset(built, tmp_path):
  data_dir = str(tmp_path / 'tfds')
  vae = load_fake_vae(built['vae_dir'])
  val = tmp_path / 'val'
  for name in CLASSES:       # same classes, 2 images each
    os.makedirs(val / name)
    for i in range(2):
      Image.open(os.path.join(built['folder'], name, f'{name}_{i:02d}.JPEG')).save(val / name / f'v{i}.png')
  args = dict(data_dir=data_dir, resolution=RES, batch_size=3, chunk=4, vae=vae, log=io.StringIO())
  latents.build_latents(f"folder:{built['folder']}", built['vae_dir'], **args)
  path = latents.build_latents(f'folder:{val}', built['vae_dir'], split='validation', **args)
  info = latents.read_info(path)
  assert info['num_examples'] == {'train': 24, 'validation': 6}
  assert len(_records(path, 'validation')) == 6
  got = _records(path, 'train')
  assert [r['mean'].tobytes() for r in got] == [r['mean'].tobytes() for r in _records(built['path'])]


def test_a_kill_between_the_final_renames_is_repaired_by_the_rerun(built, tmp_path, monkeypatch):
  data_dir = str(tmp_path / 'tfds')
  vae = load_fake_vae(built['vae_dir'])
  args = dict(data_dir=data_dir, resolution=RES, batch_size=3, chunk=4, vae=vae, log=io.StringIO())
  final = latents.build_latents(f"folder:{built['folder']}", built['vae_dir'], **args)
  real_replace = os.replace

  def dies_before_the_new_version_moves_in(src, dst):
    if dst == final:
      raise _Interrupt       # the old version has moved aside, the new one not yet in
    real_replace(src, dst)

  monkeypatch.setattr(latents.os, 'replace', dies_before_the_new_version_moves_in)
  with pytest.raises(_Interrupt):
    latents.build_latents(f"folder:{built['folder']}", built['vae_dir'], split='again', **args)
  monkeypatch.setattr(latents.os, 'replace', real_replace)
  assert not os.path.exists(final)
  latents.build_latents(f"folder:{built['folder']}", built['vae_dir'], split='again', **args)
  assert latents.read_info(final)['num_examples'] == {'train': 24, 'again': 24}
  want = [r['mean'].tobytes() for r in _records(built['path'])]
  assert [r['mean'].tobytes() for r in _records(final, 'train')] == want
  # TFDS orders each split by a hash of (split, key): compare the new split by source_index.
  by_index = lambda records: {int(r['source_index']): r['mean'].tobytes() for r in records}
  assert by_index(_records(final, 'again')) == by_index(_records(built['path']))
  assert not os.path.exists(final + latents.PARTIAL_SUFFIX)


def test_missing_inputs_stop_before_encoding_with_one_message(built, tmp_path, capsys):
  def run(*args):
    with pytest.raises(SystemExit) as err:
      latents.main(['build', f'--data_dir={tmp_path / "tfds"}', *args])
    return str(err.value)

  (tmp_path / 'empty' / 'some_class').mkdir(parents=True)
  assert 'No images' in run(f"--source=folder:{tmp_path / 'empty'}", f"--autoencoder={built['vae_dir']}",
                            '--resolution=32', '--_autoencoder_loader=test_latents:load_fake_vae')
  assert 'does not exist' in run(f"--source=folder:{built['folder']}", f"--autoencoder={tmp_path / 'no_vae'}",
                                 '--resolution=32')
  message = run('--source=tfds:mnist5k', f"--autoencoder={built['vae_dir']}",
                '--_autoencoder_loader=test_latents:load_fake_vae')
  assert 'not prepared' in message and 'python -m fmjax.data.mnist5k' in message
  assert '--resolution' in run(f"--source=folder:{built['folder']}", f"--autoencoder={built['vae_dir']}",
                               '--_autoencoder_loader=test_latents:load_fake_vae')
  assert not os.path.exists(tmp_path / 'tfds')


def _tiny_tfds(data_dir, name, channels):
  import tensorflow_datasets as tfds
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, size=(6, 16, 16, channels), dtype=np.uint8)
  local_tfds.build(name, '1.0.0', data_dir, 'test images',
                   {'image': local_tfds.uint8_tensor((16, 16, channels)),
                    'label': tfds.features.ClassLabel(num_classes=3)},
                   {'train': lambda: ((i, {'image': images[i], 'label': i % 3}) for i in range(6))})
  return images


def test_tfds_sources_keep_or_replicate_grayscale_and_refuse_a_mismatch(tmp_path):
  import tensorflow_datasets as tfds
  data_dir = str(tmp_path / 'tfds')
  _tiny_tfds(data_dir, 'tinygray', 1)
  _tiny_tfds(data_dir, 'tinyrgb', 3)
  stored = tfds.data_source('tinygray', data_dir=data_dir, split='train')   # source_index: stored order
  gray = np.stack([stored[i]['image'] for i in range(len(stored))])
  stored_labels = [int(stored[i]['label']) for i in range(len(stored))]
  log = io.StringIO()
  for in_channels, expected in ((3, np.repeat(gray, 3, axis=-1)), (1, gray)):
    vae = load_fake_vae(_write_fake_vae(tmp_path / f'vae{in_channels}', in_channels=in_channels))
    name = f'tinygray{in_channels}_latents'
    path = latents.build_latents('tfds:tinygray', 'vae', data_dir=data_dir, name=name, vae=vae, log=log)
    info = latents.read_info(path)
    assert info['crop'] == 'none' and info['resolution'] == 16 and info['latent_shape'] == [4, 4, 4]
    for record in _records(path):
      i = int(record['source_index'])
      assert int(record['label']) == stored_labels[i]
      mean, _ = vae.encode(expected[i:i + 1].astype(np.float32) / 127.5 - 1)
      np.testing.assert_allclose(record['mean'], mean[0], rtol=1e-6, atol=1e-6)
  vae = load_fake_vae(tmp_path / 'vae3')
  path = latents.build_latents('tfds:tinygray', 'vae', data_dir=data_dir, resolution=32, vae=vae, log=log)
  assert path.endswith(os.path.join('tinygray_latents', '1.0.0'))      # the default name
  info = latents.read_info(path)
  assert info['crop'] == 'adm_center_crop_32' and info['latent_shape'] == [8, 8, 4]
  with pytest.raises(latents.BuildError, match='RGB images but the autoencoder takes 1 channel'):
    latents.build_latents('tfds:tinyrgb', 'vae', data_dir=data_dir, vae=load_fake_vae(tmp_path / 'vae1'))
  with pytest.raises(latents.BuildError, match='multiple of'):
    latents.build_latents('tfds:tinyrgb', 'vae', data_dir=data_dir,
                          vae=load_fake_vae(_write_fake_vae(tmp_path / 'vae5', factor=5)))


def test_with_a_real_small_autoencoder(tmp_path):
  autoencoders = pytest.importorskip('fmjax.autoencoders')
  if not hasattr(autoencoders, 'load'):
    pytest.skip('fmjax.autoencoders is not complete yet')
  import jax
  folder = tmp_path / 'imgs'
  _write_folder(folder, per_class=2)
  vae_dir = str(tmp_path / 'vae')
  autoencoders.save(vae_dir, autoencoders.init(autoencoders.AutoencoderConfig(
      block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4),
      jax.random.PRNGKey(0)))
  vae = autoencoders.load(vae_dir)
  path = latents.build_latents(f'folder:{folder}', vae_dir, data_dir=str(tmp_path / 'tfds'), resolution=RES,
                               batch_size=2, chunk=3, log=io.StringIO())
  info = latents.read_info(path)
  assert info['autoencoder_digest'] == vae.digest and info['scaling_factor'] == vae.scaling_factor
  assert info['latent_shape'] == list(vae.latent_shape((RES, RES, 3)))
  paths, _, _ = image_folder.list_images(str(folder))
  for record in _records(path):
    x = image_folder.read_image(paths[int(record['source_index'])], RES)[None].astype(np.float32) / 127.5 - 1
    mean, std = vae.encode(np.concatenate([x, x[:, :, ::-1]]))
    for key, want in (('mean', mean[0]), ('std', std[0]), ('mean_flip', mean[1]), ('std_flip', std[1])):
      np.testing.assert_allclose(record[key], want, rtol=1e-4, atol=1e-5, err_msg=key)


# ----------------------------------------------------------------------------- the training draw


def _config(data_dir, name, batch_size=64, num_classes=0):
  config = configs.base_config()
  config.data.name = name
  config.data.data_dir = data_dir
  config.data.num_classes = num_classes
  config.train.batch_size = batch_size
  return config


SCALE, STD, STD_FLIP = 0.25, 0.5, 1.5


@pytest.fixture(scope='module')
def constant_latents(tmp_path_factory):
  """32 examples of shape [8, 8, 4]: mean = label + 1 and std 0.5, mean_flip = -(label + 1) and
  std_flip 1.5, scaling factor 0.25, written directly in the builder's format."""
  import tensorflow_datasets as tfds
  data_dir = str(tmp_path_factory.mktemp('constant'))
  shape = (8, 8, 4)

  def examples():
    for i in range(32):
      label = i % 4
      yield i, {'mean': np.full(shape, label + 1, np.float32), 'std': np.full(shape, STD, np.float32),
                'mean_flip': np.full(shape, -(label + 1), np.float32),
                'std_flip': np.full(shape, STD_FLIP, np.float32), 'label': label, 'source_index': i}

  tensor = lambda: tfds.features.Tensor(shape=shape, dtype=np.float32)
  path = local_tfds.build('const_latents', '1.0.0', data_dir, 'constant moments',
                          {'mean': tensor(), 'std': tensor(), 'mean_flip': tensor(), 'std_flip': tensor(),
                           'label': tfds.features.ClassLabel(num_classes=4),
                           'source_index': tfds.features.Tensor(shape=(), dtype=np.int64)},
                          {'train': examples})
  with open(os.path.join(path, latents.SIDECAR), 'w') as f:
    json.dump({'format_version': 1, 'scaling_factor': SCALE, 'autoencoder_digest': 'fake:const',
               'crop': 'none', 'latent_shape': list(shape)}, f)
  return data_dir


def test_the_pipeline_draws_mean_plus_std_eps_times_scale_with_random_flips(constant_latents):
  config = _config(constant_latents, 'const_latents', num_classes=4)
  source = pipelines.ImageSource(config, sharding.make_mesh())
  assert source.example_shape == (8, 8, 4) and pipelines.example_shape(config) == (8, 8, 4)
  assert source.latent_info['autoencoder_digest'] == 'fake:const'
  batches = [source.batch(step) for step in range(8)]
  z = np.concatenate([np.asarray(b['x1']) for b in batches]) / SCALE          # 512 draws
  labels = np.concatenate([np.asarray(b['labels']) for b in batches])
  assert z.dtype == np.float32 and labels.dtype == np.int32
  per_draw = z.reshape(len(z), -1).mean(axis=1)
  flipped = per_draw < 0
  # Each draw is one of the two moments of its own example, with the flip half the time.
  np.testing.assert_allclose(np.abs(per_draw), labels + 1, atol=0.4)
  assert 0.42 < flipped.mean() < 0.58
  centered = z - np.where(flipped, -(labels + 1.0), labels + 1.0)[:, None, None, None]
  for chosen, std in ((~flipped, STD), (flipped, STD_FLIP)):
    eps = centered[chosen] / std
    assert abs(eps.mean()) < 0.02 and abs(eps.var() - 1) < 0.03
    draw_std = centered[chosen].reshape(chosen.sum(), -1).std(axis=1)
    np.testing.assert_allclose(draw_std, std, rtol=0.2)
  # A new eps every draw: one example read in two epochs gives two latents.
  assert len({row.tobytes() for row in z}) == len(z)


def test_the_draw_is_a_function_of_seed_and_position_and_resumes(constant_latents):
  config = _config(constant_latents, 'const_latents', batch_size=8, num_classes=4)
  mesh = sharding.make_mesh()
  first = pipelines.ImageSource(config, mesh)
  batches = [first.batch(step) for step in range(2)]
  state = first.get_state()
  later = [first.batch(step) for step in range(2, 4)]
  again = pipelines.ImageSource(config, mesh)
  np.testing.assert_array_equal(np.asarray(again.batch(0)['x1']), np.asarray(batches[0]['x1']))
  resumed = pipelines.ImageSource(config, mesh)
  resumed.set_state(json.loads(json.dumps(state)))
  for step, expected in zip((2, 3), later):
    got = resumed.batch(step)
    np.testing.assert_array_equal(np.asarray(got['x1']), np.asarray(expected['x1']))
    np.testing.assert_array_equal(np.asarray(got['labels']), np.asarray(expected['labels']))
  config.seed = config.seed + 1
  other = pipelines.ImageSource(config, mesh)
  assert not np.array_equal(np.asarray(other.batch(0)['x1']), np.asarray(batches[0]['x1']))


def test_in_memory_reads_give_the_batches_of_decoded_reads(constant_latents):
  """config.data.in_memory_gib: a set small enough is decoded once into arrays; the batches,
  draws and resumed stream are those of reading the ArrayRecord files every time."""
  from fmjax.data import datasets
  config = _config(constant_latents, 'const_latents', batch_size=8, num_classes=4)
  mesh = sharding.make_mesh()
  config.data.in_memory_gib = 0.0
  decoded = pipelines.ImageSource(config, mesh)
  config.data.in_memory_gib = 1.0
  cached = pipelines.ImageSource(config, mesh)
  assert cached.in_memory and not decoded.in_memory
  for step in range(6):    # 48 reads of 32 examples: into the second epoch
    a, b = decoded.batch(step), cached.batch(step)
    for key in ('x1', 'labels'):
      np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
  assert cached.get_state() == decoded.get_state()
  # The size limit holds: 32 examples of 4 x 8 x 8 x 4 floats (+ label, index) are ~129 KiB.
  opened = datasets.open_split('const_latents', constant_latents, 'train')
  assert isinstance(datasets.in_memory(opened.source, 2**17 + 2**10), datasets.StackedExamples)
  assert datasets.in_memory(opened.source, 2**17) is opened.source
  assert datasets.in_memory(opened.source, 0) is opened.source
  # The benchmark behind the docs' pipeline numbers runs on it (one batch per variant).
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
  try:
    import data_throughput
  finally:
    sys.path.pop(0)
  assert data_throughput.batches_per_second(config, 1.0, 2, 1) > 0
  config.data.read_threads = 0
  with pytest.raises(configs.ConfigError, match='read_threads'):
    configs.validate(config)
  config.data.read_threads, config.data.worker_count = 4, 2
  with pytest.raises(configs.ConfigError, match='worker_count = 2: reading in worker processes'):
    configs.validate(config)


def test_built_datasets_are_found_by_name_and_read_for_training(built):
  config = _config(built['data_dir'], f'imagenet{RES}_latents', batch_size=4, num_classes=3)
  source = pipelines.make_source(config, sharding.make_mesh())
  assert source.latent_info == latents.read_info(built['path'])
  assert source.example_shape == (RES // 4, RES // 4, 4) and source.num_examples == 24
  assert np.asarray(source.batch(0)['x1']).shape == (4, RES // 4, RES // 4, 4)
  with pytest.raises(pipelines.DatasetNotFoundError, match='python -m fmjax.data.latents build'):
    pipelines.find_prepared('imagenet512_latents', built['data_dir'])
  with pytest.raises(pipelines.DatasetNotFoundError, match='--source=tfds:mnist5k'):
    pipelines.find_prepared('mnist5k_latents', built['data_dir'])
  with pytest.raises(ValueError, match='_latents'):
    pipelines.find_prepared('imagenet', built['data_dir'])
