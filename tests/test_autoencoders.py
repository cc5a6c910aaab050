"""fmjax.autoencoders: SD-VAE parity with diffusers, folder loading and saving, batching.

The golden folders in tests/data/vae_golden/ were written by diffusers 0.42.1 (torch 2.13 CPU)
with tools/make_vae_golden.py: two small AutoencoderKL networks of SD-VAE's architecture with
perturbed seeded weights, and diffusers' float64 outputs on seeded inputs. No torch here.

Tolerances. float32: max|a - b| <= 1e-4 max|b| per array (diffusers' own float32 forward is
within 6e-6 of its float64 one on these folders). std is checked per latent channel and, in
log space, elementwise (one channel of sdvae_small spans exp(-15) .. exp(10) through the clamp).
bfloat16: BF16_BOUND (below) on the mean and the decoded images, measured 1.7e-2 / 5.9e-2 /
7.1e-2 at these widths; the log-std of the channel stretched past the clamp (its log-variance
spans 80 units) is not compared in bfloat16, the other channels are (BF16_LOG_STD_BOUND).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy

from fmjax import autoencoders as ae
from fmjax.autoencoders import kl, loading

GOLDEN = os.path.join(os.path.dirname(__file__), 'data', 'vae_golden')
NAMES = ('sdvae_small', 'gray_noattn')
TOL = 1e-4
BF16_BOUND = 0.15
BF16_LOG_STD_BOUND = 0.1


def rel(a, b) -> float:
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def golden(name):
  with np.load(os.path.join(GOLDEN, name, 'golden.npz')) as g:
    return {k: g[k] for k in g.files}


@pytest.fixture(scope='module')
def vaes():
  return {name: ae.load(os.path.join(GOLDEN, name), batch_size=2) for name in NAMES}


@pytest.fixture
def folder(tmp_path):
  """A writable copy of a golden folder (without golden.npz)."""
  def copy(name='gray_noattn'):
    dst = tmp_path / name
    dst.mkdir()
    for f in (loading.CONFIG_NAME, loading.WEIGHTS_NAME):
      shutil.copy(os.path.join(GOLDEN, name, f), dst / f)
    return str(dst)
  return copy


def edit_config(path, **changes):
  with open(os.path.join(path, loading.CONFIG_NAME)) as f:
    fields = json.load(f)
  fields.update(changes)
  with open(os.path.join(path, loading.CONFIG_NAME), 'w') as f:
    json.dump(fields, f)


def edit_tensors(path, fn):
  weights = os.path.join(path, loading.WEIGHTS_NAME)
  tensors = safetensors.numpy.load_file(weights)
  fn(tensors)
  safetensors.numpy.save_file(tensors, weights)


# ---------------------------------------------------------------------------------------------
# Parity with diffusers.


@pytest.mark.parametrize('name', NAMES)
def test_float32_matches_diffusers(vaes, name):
  vae, g = vaes[name], golden(name)
  mean, std = vae.encode(g['images'])
  assert mean.dtype == std.dtype == np.float32 and mean.shape == g['mean'].shape
  assert mean.shape[1:] == vae.latent_shape(g['images'].shape[1:])
  assert rel(mean, g['mean']) <= TOL
  for c in range(std.shape[-1]):
    assert rel(std[..., c], g['std'][..., c]) <= TOL, c
  assert rel(np.log(std), np.log(g['std'])) <= TOL
  decoded = vae.decode(g['mean'])
  assert decoded.shape == g['decoded_mean'].shape == g['images'].shape
  assert rel(decoded, g['decoded_mean']) <= TOL
  assert rel(vae.decode(g['latents']), g['decoded_latents']) <= TOL


def test_golden_exercises_the_logvar_clamp():
  std = golden('sdvae_small')['std'][..., 0]
  # exp(20 / 2) and exp(-30 / 2): both bounds hit, and values in between.
  assert np.isclose(std.max(), np.exp(10.0), rtol=1e-6) and np.isclose(std.min(), np.exp(-15.0), rtol=1e-6)
  assert ((std > np.exp(-14.0)) & (std < np.exp(9.0))).any()


@pytest.mark.parametrize('name', NAMES)
def test_bfloat16_within_documented_bound(name):
  vae, g = ae.load(os.path.join(GOLDEN, name), dtype='bfloat16', batch_size=2), golden(name)
  mean, std = vae.encode(g['images'])
  assert mean.dtype == np.float32
  assert rel(mean, g['mean']) <= BF16_BOUND
  first = 1 if name == 'sdvae_small' else 0   # channel 0 of sdvae_small: stretched past the clamp
  assert rel(np.log(std[..., first:]), np.log(g['std'][..., first:])) <= BF16_LOG_STD_BOUND
  assert rel(vae.decode(g['mean']), g['decoded_mean']) <= BF16_BOUND
  assert rel(vae.decode(g['latents']), g['decoded_latents']) <= BF16_BOUND
  assert vae.digest == ae.load(os.path.join(GOLDEN, name)).digest   # same weights, other compute dtype


@pytest.mark.parametrize('name', NAMES)
def test_config_is_read_as_diffusers_wrote_it(vaes, name):
  with open(os.path.join(GOLDEN, name, loading.CONFIG_NAME)) as f:
    fields = json.load(f)
  vae = vaes[name]
  assert vae.scaling_factor == fields['scaling_factor']
  assert vae.downsample_factor == 2 ** (len(fields['block_out_channels']) - 1)
  assert vae.config.to_dict() == {k: v for k, v in fields.items() if k not in kl.IGNORED_FIELDS}


# ---------------------------------------------------------------------------------------------
# Pure functions, batching, compilation.


def test_pure_functions_inside_a_callers_jit(vaes):
  vae, g = vaes['sdvae_small'], golden('sdvae_small')
  roundtrip = jax.jit(lambda p, x: vae.decode_fn(p, vae.encode_fn(p, x)[0]))
  assert rel(roundtrip(vae.params, g['images']), g['decoded_mean']) <= TOL


def test_compiles_once_and_odd_batches_match_one_by_one(vaes):
  vae = vaes['sdvae_small']
  assert vae.batch_size == 2
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (3,) + golden('sdvae_small')['images'].shape[1:]).astype(np.float32)
  mean, std = vae.encode(images)
  singles = [vae.encode(images[i:i + 1]) for i in range(3)]
  np.testing.assert_allclose(mean, np.concatenate([m for m, _ in singles]), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(std, np.concatenate([s for _, s in singles]), rtol=1e-6)
  decoded = vae.decode(mean)
  np.testing.assert_allclose(decoded, np.concatenate([vae.decode(mean[i:i + 1]) for i in range(3)]),
                             rtol=1e-6, atol=1e-6)
  assert vae.encode(jax.numpy.asarray(images[:0]))[0].shape == (0,) + mean.shape[1:]
  assert vae.trace_counts == {'encode': 1, 'decode': 1}


def test_shapes_and_input_checks(vaes):
  vae = vaes['sdvae_small']
  assert vae.latent_shape((256, 256, 3)) == (32, 32, 4) and vae.image_shape((32, 32, 4)) == (256, 256, 3)
  with pytest.raises(ValueError, match=r'\[batch, height, width, 3\]'):
    vae.encode(np.zeros((1, 32, 48, 1), np.float32))
  with pytest.raises(ValueError, match=r'\[batch, height, width, 4\]'):
    vae.decode(np.zeros((1, 4, 6, 3), np.float32))
  if jax.local_device_count() > 1:
    with pytest.raises(ValueError, match='multiple'):
      ae.Autoencoder(vae.config, vae.params, batch_size=jax.local_device_count() + 1)


# ---------------------------------------------------------------------------------------------
# Saving, loading, digests.


def test_save_load_round_trip_is_exact(vaes, tmp_path):
  vae = vaes['sdvae_small']
  back = ae.load(ae.save(tmp_path / 'copy', vae))
  assert back.config == vae.config and back.digest == vae.digest
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back.params, vae.params)
  with open(tmp_path / 'copy' / loading.CONFIG_NAME) as f:
    assert json.load(f)['_class_name'] == 'AutoencoderKL'
  # The same tensors as diffusers wrote (names, layouts, bytes).
  ours = safetensors.numpy.load_file(str(tmp_path / 'copy' / loading.WEIGHTS_NAME))
  theirs = safetensors.numpy.load_file(os.path.join(GOLDEN, 'sdvae_small', loading.WEIGHTS_NAME))
  assert ours.keys() == theirs.keys()
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)


def test_digest_is_stable_and_sees_one_changed_weight(vaes, folder):
  path = folder()
  assert ae.load(path).digest == vaes['gray_noattn'].digest
  assert vaes['gray_noattn'].digest.startswith('sha256:')
  assert vaes['gray_noattn'].digest != vaes['sdvae_small'].digest

  def nudge(t):
    w = t['decoder.conv_out.bias']
    t['decoder.conv_out.bias'] = np.nextafter(w, np.inf).astype(w.dtype)
  edit_tensors(path, nudge)
  assert ae.load(path).digest != vaes['gray_noattn'].digest


def test_legacy_attention_names_load_to_the_same_weights(vaes, folder):
  path = folder('sdvae_small')
  def legacy(t):
    for part in ('encoder', 'decoder'):
      base = f'{part}.mid_block.attentions.0'
      for new, old in (('to_q', 'query'), ('to_k', 'key'), ('to_v', 'value'), ('to_out.0', 'proj_attn')):
        w = t.pop(f'{base}.{new}.weight')
        t[f'{base}.{old}.weight'] = w[:, :, None, None] if old == 'value' else w   # a 1x1 conv too
        t[f'{base}.{old}.bias'] = t.pop(f'{base}.{new}.bias')
  edit_tensors(path, legacy)
  assert ae.load(path).digest == vaes['sdvae_small'].digest


def test_init_makes_a_working_autoencoder():
  config = ae.AutoencoderConfig(block_out_channels=(8, 16), norm_num_groups=4, in_channels=2,
                                out_channels=1, latent_channels=3)
  vae = ae.init(config, 0, batch_size=1)
  mean, std = vae.encode(np.zeros((1, 8, 6, 2), np.float32))
  assert mean.shape == std.shape == (1, 4, 3, 3) and vae.decode(mean).shape == (1, 8, 6, 1)
  assert ae.init(config, 1).digest != vae.digest
  sd = ae.AutoencoderConfig.sd_vae()
  assert sd.block_out_channels == (128, 256, 512, 512) and sd.downsample_factor == 8


# ---------------------------------------------------------------------------------------------
# Refusals.


@pytest.mark.parametrize('damage, named', [
    (lambda t: t.pop('encoder.mid_block.attentions.0.to_q.bias'), 'encoder.mid_block.attentions.0.to_q.bias'),
    (lambda t: t.update({'decoder.extra.weight': np.zeros(3, np.float32)}), 'decoder.extra.weight'),
    (lambda t: t.update({'decoder.conv_out.weight': np.zeros((3, 8, 1, 1), np.float32)}),
     'decoder.conv_out.weight'),
    (lambda t: t.update({'quant_conv.bias': t['quant_conv.bias'][:4]}), 'quant_conv.bias'),
])
def test_damaged_tensors_are_refused_by_name(folder, damage, named):
  path = folder('sdvae_small')
  edit_tensors(path, damage)
  with pytest.raises(ae.AutoencoderLoadError, match=r'\b' + named.replace('.', r'\.') + r'\b') as err:
    ae.load(path)
  assert path in str(err.value)


@pytest.mark.parametrize('change, named', [
    (dict(foo_bar=1), 'foo_bar'),
    (dict(act_fn='gelu'), 'act_fn'),
    (dict(shift_factor=0.1159), 'shift_factor'),
    (dict(latents_mean=[0.0, 0.0]), 'latents_mean'),
    (dict(down_block_types=['AttnDownEncoderBlock2D', 'DownEncoderBlock2D']), 'down_block_types'),
    (dict(up_block_types=['UpDecoderBlock2D']), 'up_block_types'),
    (dict(norm_num_groups=3), 'norm_num_groups'),
    (dict(use_quant_conv='yes'), 'use_quant_conv'),
    (dict(_class_name='AutoencoderTiny'), '_class_name'),
])
def test_unsupported_config_is_refused_by_field(folder, change, named):
  path = folder()
  edit_config(path, **change)
  with pytest.raises(ae.ConfigError, match=named):
    ae.load(path)


def test_a_config_that_disagrees_with_the_weights_names_the_tensors(folder):
  path = folder()
  edit_config(path, use_quant_conv=True)
  with pytest.raises(ae.AutoencoderLoadError, match=r'2 missing tensors: quant_conv\.bias, quant_conv\.weight'):
    ae.load(path)


def test_missing_files_say_what_the_folder_must_hold(folder, tmp_path):
  path = folder()
  os.remove(os.path.join(path, loading.WEIGHTS_NAME))
  for where in (path, str(tmp_path / 'nowhere')):
    with pytest.raises(FileNotFoundError, match='config.json and diffusion_pytorch_model.safetensors'):
      ae.load(where)
  with open(os.path.join(path, loading.WEIGHTS_NAME), 'wb') as f:
    f.write(b'not a safetensors file')
  with pytest.raises(ae.AutoencoderLoadError, match=loading.WEIGHTS_NAME):
    ae.load(path)
