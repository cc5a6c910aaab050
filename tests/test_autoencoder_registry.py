"""The autoencoder registry: a kind registered from outside the package (an exactly invertible
space-to-depth map with no weights file) is what `fmjax.autoencoders.load` returns for a folder
whose config.json names it, and the latent builder, `from_config` and the evaluator's decoder
accept it; an unknown `_class_name` and an object missing a protocol member are refused by name."""

import json
import os
import types

import ml_collections
import numpy as np
import pytest
from PIL import Image

from fmjax import autoencoders, from_config, sharding
from fmjax.autoencoders import registry
from fmjax.data import image_folder, latents
from fmjax.evaluation import evaluator

KIND = 'SpaceToDepth'


class SpaceToDepth:
  """Each f x f pixel block becomes f * f * C channels (channel index (a f + b) C + k for pixel
  (a, b) of the block, channel k): exactly invertible, no weights. std is a constant, so latents
  drawn from it differ from the mean, as a VAE's do."""

  def __init__(self, factor, in_channels, scaling_factor):
    self.config = types.SimpleNamespace(factor=factor, in_channels=in_channels)
    self.downsample_factor = factor
    self.scaling_factor = scaling_factor
    self.params = {}
    self.digest = f'space_to_depth:f{factor}c{in_channels}s{scaling_factor}'

  def latent_shape(self, image_shape_hwc):
    h, w, c = image_shape_hwc
    f = self.downsample_factor
    return h // f, w // f, c * f * f

  def encode(self, images):
    x = np.asarray(images, np.float32)
    n, h, w, c = x.shape
    f = self.downsample_factor
    mean = x.reshape(n, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5).reshape(
        n, h // f, w // f, f * f * c)
    return mean, np.full_like(mean, 0.01)

  @staticmethod
  def _depth_to_space(z, f):
    n, h, w, d = z.shape
    c = d // (f * f)
    return z.reshape(n, h, w, f, f, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h * f, w * f, c)

  def decode(self, latents):
    return self._depth_to_space(np.asarray(latents, np.float32), self.downsample_factor)

  def decode_scaled_fn(self, params, scaled_latents):
    del params
    return self._depth_to_space(scaled_latents / self.scaling_factor, self.downsample_factor)


CALLS = []


def load_space_to_depth(folder, *, dtype, mesh, batch_size):
  CALLS.append({'folder': folder, 'dtype': dtype, 'mesh': mesh, 'batch_size': batch_size})
  with open(os.path.join(folder, 'config.json')) as f:
    fields = json.load(f)
  return SpaceToDepth(fields['factor'], fields['in_channels'], fields['scaling_factor'])


@pytest.fixture
def registered():
  autoencoders.register(KIND, load_space_to_depth)
  yield
  autoencoders.unregister(KIND)


def _write_config(folder, **fields):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(fields, f)
  return str(folder)


def _s2d_folder(tmp_path, name='s2d', factor=2, in_channels=3, scaling_factor=0.5):
  return _write_config(tmp_path / name, _class_name=KIND, factor=factor, in_channels=in_channels,
                       scaling_factor=scaling_factor)


def test_a_registered_kind_is_loaded_and_round_trips_images_exactly(registered, tmp_path):
  folder = _s2d_folder(tmp_path)
  CALLS.clear()
  vae = autoencoders.load(folder, dtype='bfloat16', batch_size=6)
  assert isinstance(vae, SpaceToDepth) and isinstance(vae, autoencoders.AutoencoderProtocol)
  assert CALLS == [{'folder': folder, 'dtype': 'bfloat16', 'mesh': None, 'batch_size': 6}]
  assert KIND in autoencoders.registered() and 'AutoencoderKL' in autoencoders.registered()
  images = np.random.default_rng(0).uniform(-1, 1, (2, 8, 6, 3)).astype(np.float32)
  mean, std = vae.encode(images)
  assert mean.shape == (2,) + vae.latent_shape((8, 6, 3)) == (2, 4, 3, 12)
  # The layout, written out pixel by pixel.
  for i, j, a, b, k in np.ndindex(4, 3, 2, 2, 3):
    assert mean[1, i, j, (a * 2 + b) * 3 + k] == images[1, 2 * i + a, 2 * j + b, k]
  np.testing.assert_array_equal(vae.decode(mean), images)
  # What a latent model generates, z = scaling_factor * mean, decodes to the images (0.5: exact).
  decode = evaluator.decoder(vae, sharding.local_mesh())
  np.testing.assert_array_equal(np.asarray(decode(vae.scaling_factor * mean)), images)


def test_an_unknown_class_name_names_the_registered_kinds_before_reading_weights(registered, tmp_path):
  folder = _write_config(tmp_path / 'dcae', _class_name='AutoencoderDC', latent_channels=32)
  with pytest.raises(autoencoders.UnknownAutoencoderError) as err:
    autoencoders.load(folder)     # no weights file: the error comes from config.json alone
  message = str(err.value)
  for named in ("'AutoencoderDC'", 'AutoencoderKL', KIND, 'fmjax.autoencoders.register',
                'AutoencoderProtocol', 'config.json'):
    assert named in message, named
  assert isinstance(err.value, autoencoders.ConfigError)   # what --config.autoencoder reports
  with pytest.raises(autoencoders.ConfigError, match='must be a string'):
    autoencoders.load(_write_config(tmp_path / 'bad', _class_name=3))


def test_folders_without_a_class_name_stay_autoencoder_kl(tmp_path):
  assert registry.kind_of(_write_config(tmp_path / 'plain', latent_channels=4)) == 'AutoencoderKL'
  assert registry.kind_of(tmp_path / 'nowhere') == 'AutoencoderKL'
  with pytest.raises(FileNotFoundError, match='config.json and diffusion_pytorch_model.safetensors'):
    autoencoders.load(tmp_path / 'nowhere')


@pytest.mark.parametrize('damage, named', [
    (lambda vae: vars(vae).pop('digest'), 'lacks digest:'),
    (lambda vae: setattr(vae, 'config', object()), 'lacks config.in_channels:'),
    (lambda vae: setattr(vae, 'decode_scaled_fn', 'not a function'), r'lacks decode_scaled_fn \(not callable\):'),
])
def test_a_loaded_object_missing_a_protocol_member_is_refused_by_name(tmp_path, damage, named):
  def loader(folder, **options):
    vae = load_space_to_depth(folder, **options)
    damage(vae)
    return vae

  autoencoders.register(KIND, loader)
  try:
    with pytest.raises(autoencoders.AutoencoderProtocolError, match=named) as err:
      autoencoders.load(_s2d_folder(tmp_path))
    assert isinstance(err.value, ValueError) and isinstance(err.value, TypeError)
  finally:
    autoencoders.unregister(KIND)
  with pytest.raises(autoencoders.UnknownAutoencoderError):   # unregistered again
    autoencoders.load(_s2d_folder(tmp_path))


def test_the_built_in_autoencoder_satisfies_the_protocol_without_hashing_its_weights():
  vae = autoencoders.init(autoencoders.AutoencoderConfig(
      block_out_channels=(8,), layers_per_block=1, norm_num_groups=4, latent_channels=4), 0)
  assert autoencoders.missing_members(vae) == []
  assert 'digest' not in vars(vae)   # the cached property was not computed by the check
  assert isinstance(vae, autoencoders.AutoencoderProtocol)


def test_register_refuses_what_load_could_not_use(registered):
  with pytest.raises(ValueError, match='already registered'):
    autoencoders.register(KIND, load_space_to_depth)
  with pytest.raises(ValueError, match=r'loader\(folder, \*, dtype, mesh, batch_size\)'):
    autoencoders.register('Other', lambda folder: None)
  with pytest.raises(ValueError, match='non-empty string'):
    autoencoders.register('', load_space_to_depth)
  with pytest.raises(ValueError, match='built in'):
    autoencoders.unregister('AutoencoderKL')
  assert 'Other' not in autoencoders.registered()
  autoencoders.register(KIND, load_space_to_depth, replace=True)


def test_the_latent_builder_and_a_run_config_accept_a_registered_kind(registered, tmp_path):
  res, classes = 16, ('a', 'b')
  rng = np.random.default_rng(1)
  for name in classes:
    os.makedirs(tmp_path / 'images' / name)
    for i in range(2):
      Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(
          tmp_path / 'images' / name / f'{name}{i}.png')
  folder = _s2d_folder(tmp_path)
  data_dir = str(tmp_path / 'tfds')
  latents.main(['build', f'--source=folder:{tmp_path / "images"}', f'--resolution={res}',
                f'--autoencoder={folder}', '--name=s2d16_latents', f'--data_dir={data_dir}',
                '--batch_size=2', '--workers=1'])
  path = os.path.join(data_dir, 's2d16_latents', '1.0.0')
  info = latents.read_info(path)
  assert info['autoencoder_digest'] == 'space_to_depth:f2c3s0.5' and info['scaling_factor'] == 0.5
  assert info['latent_shape'] == [8, 8, 12]
  import tensorflow_datasets as tfds
  source = tfds.builder_from_directory(path).as_data_source(split='train')
  paths, _, _ = image_folder.list_images(str(tmp_path / 'images'))
  assert len(source) == len(paths) == 4
  for record in (source[i] for i in range(len(source))):
    x = image_folder.read_image(paths[int(record['source_index'])], res)[None].astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(SpaceToDepth(2, 3, 0.5).decode(record['mean'][None]), x)
  # A run naming the folder gets the registered kind, and it matches the dataset it built.
  config = ml_collections.ConfigDict({'autoencoder': folder, 'eval': {'decode_dtype': 'float32'}})
  vae = from_config.load_autoencoder(config)
  assert isinstance(vae, SpaceToDepth)
  from_config.check_autoencoder(vae, info, 'the s2d latents')


REGISTRATION = '''
import fmjax.autoencoders
import test_autoencoder_registry as shared   # the tests' SpaceToDepth loader

fmjax.autoencoders.register(shared.KIND, shared.load_space_to_depth, replace=True)
'''


def test_the_build_command_registers_a_kind_from_a_file(tmp_path, capsys):
  """`python -m fmjax.data.latents build --register=FILE` runs FILE (which registers the kind)
  before loading the autoencoder; without it, an unregistered kind and a file that raises are
  each one message that says what to do, before any image is read."""
  images = tmp_path / 'images' / 'a'
  os.makedirs(images)
  for i in range(2):
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(images / f'{i}.png')
  folder = _s2d_folder(tmp_path)
  args = ['build', f'--source=folder:{tmp_path / "images"}', '--resolution=8', f'--autoencoder={folder}',
          '--name=s2d8_latents', f'--data_dir={tmp_path / "tfds"}', '--batch_size=2', '--workers=1']
  autoencoders.unregister(KIND)
  with pytest.raises(SystemExit) as exit_info:
    latents.main(args)
  message = str(exit_info.value)
  assert f"`_class_name` = '{KIND}' is not a registered autoencoder kind" in message
  assert '--register=FILE' in message
  assert not os.path.exists(tmp_path / 'tfds' / 's2d8_latents')
  broken = tmp_path / 'broken.py'
  broken.write_text('import fmjax.autoencoders\n\nfmjax.autoencoders.register(UNDEFINED, None)\n')
  with pytest.raises(SystemExit, match=rf'--register={broken}: the file raised an error: {broken} '
                                       r"line 3: NameError: name 'UNDEFINED' is not defined"):
    latents.main([*args, f'--register={broken}'])
  with pytest.raises(SystemExit, match='--register=nowhere.py: no such file'):
    latents.main([*args, '--register=nowhere.py'])
  registration = tmp_path / 'register_s2d.py'
  registration.write_text(REGISTRATION)
  try:
    latents.main([*args, f'--register={registration}'])
    assert KIND in autoencoders.KINDS
  finally:
    autoencoders.unregister(KIND)
  info = latents.read_info(os.path.join(tmp_path / 'tfds', 's2d8_latents', '1.0.0'))
  assert info['autoencoder_digest'] == 'space_to_depth:f2c3s0.5' and info['latent_shape'] == [4, 4, 12]
