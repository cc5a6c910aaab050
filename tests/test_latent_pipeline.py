"""The ImageNet latent pipeline end to end on this CPU, at a tiny size: an ImageNet-style folder of
generated JPEGs (one of them corrupt) -> a latent dataset built with a small random SD-VAE ->
a few updates of `experiments/imagenet256_dit.py`'s code path -> `--mode=eval` decoding the
samples and scoring them with the real Inception network against statistics of the folder
itself -> `fmjax.load(...).sample` returning decoded images. Also: statistics of another crop
or autoencoder are refused, a run's autoencoder must be the dataset's. (Steering a latent run
judges decoded images: tests/test_mnist_latent.py.)"""

import json
import math
import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from fmjax import autoencoders, configs, main as cli
from fmjax.data import latents, pipelines
from fmjax.evaluation import fid, prepare_inception, reference_stats

EXPERIMENTS = os.path.join(os.path.dirname(__file__), '..', 'experiments')
CLASSES = ('n01440764', 'n01443537', 'n02102040')   # ImageNet-style synset folders


def _write_folder(root, per_class=5, size=64):
  """Smooth random colour fields (each class its own hue), one corrupt JPEG; returns its path."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:size, 0:size] / size
  for label, synset in enumerate(CLASSES):
    os.makedirs(root / synset)
    for i in range(per_class):
      phase = rng.uniform(0, 2 * np.pi, 3)
      image = 127.5 + 100 * np.sin(2 * np.pi * (xx * (label + 1) + yy * rng.uniform(0.5, 2))[..., None]
                                   + phase)
      # Non-square sources exercise the ADM crop's resize.
      Image.fromarray(image.clip(0, 255).astype(np.uint8)).resize((size + 16 * i, size)).save(
          root / synset / f'{synset}_{i}.JPEG', quality=95)
  corrupt = root / CLASSES[1] / f'{CLASSES[1]}_broken.JPEG'
  corrupt.write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  return str(corrupt)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('latent_pipeline')
  folder = tmp / 'imagenet' / 'train'
  corrupt = _write_folder(folder)
  vae_dir = str(tmp / 'vae')
  vae = autoencoders.init(autoencoders.AutoencoderConfig(
      block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4),
      jax.random.PRNGKey(0))
  autoencoders.save(vae_dir, vae)
  data_dir = str(tmp / 'tfds')
  latents.main(['build', f'--source=folder:{folder}', '--resolution=64', f'--autoencoder={vae_dir}',
                '--name=imagenet64_latents', f'--data_dir={data_dir}', '--batch_size=8'])
  return {'tmp': tmp, 'folder': str(folder), 'corrupt': corrupt, 'vae_dir': vae_dir,
          'data_dir': data_dir, 'digest': autoencoders.load(vae_dir).digest}


def _config(built, workdir_name='run'):
  sys.path.insert(0, EXPERIMENTS)
  try:
    import imagenet256_dit
  finally:
    sys.path.remove(EXPERIMENTS)
  c = imagenet256_dit.get_config('meanflow,tiny')
  c.data.name = 'imagenet64_latents'
  c.data.num_classes = len(CLASSES)
  c.data.data_dir = built['data_dir']
  c.autoencoder = built['vae_dir']
  c.eval.fid_reference = str(built['tmp'] / 'imagenet64_train.npz')
  c.eval.inception_weights = prepare_inception.ensure_weights()
  return c, str(built['tmp'] / workdir_name)


def test_the_builder_skips_and_reports_the_corrupt_image(built):
  info = json.loads(open(os.path.join(pipelines.find_prepared('imagenet64_latents', built['data_dir']),
                                      'fmjax_latents.json')).read())
  assert info['autoencoder_digest'] == built['digest']
  assert [os.path.basename(p) for p in info['splits']['train']['skipped']] == [os.path.basename(built['corrupt'])]
  assert info['num_examples']['train'] == 5 * len(CLASSES)


def test_train_then_eval_decodes_and_scores_with_inception(built):
  config, workdir = _config(built)
  # Reference statistics from the image folder itself (ADM crop at 64), real Inception weights.
  reference_stats.main(['--image_folder', built['folder'], '--resolution', '64',
                        '--out', config.eval.fid_reference, '--batch_size', '8',
                        '--weights', config.eval.inception_weights])
  saved = fid.load_statistics(config.eval.fid_reference)
  assert saved.provenance['crop'] == 'adm_center_crop_64' and saved.count == 15
  config.eval.at_end = False
  cli.run(config, workdir, 'train')
  results = cli.run(config, workdir, 'eval')
  rows = list(results['few_step'].values()) + list(results['ode'].values())
  assert {r['nfe'] for r in rows} == {1, 2}
  for row in rows:
    assert row['num_samples'] == 16 and math.isfinite(row['fid']) and row['fid'] > 0
  assert results['fid_reference']['crop'] == 'adm_center_crop_64'
  # The decoded grid, not latents, is what the run draws.
  grid = np.asarray(Image.open(os.path.join(workdir, 'samples', f"step_{results['step']}_1steps.png")))
  assert grid.shape[:2] == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2) or grid.shape[0] >= 128

  import fmjax
  model = fmjax.load(workdir)
  images = model.sample(jax.random.PRNGKey(1), 3, steps=1, labels=np.array([0, 1, 2]))
  assert images.shape == (3, 64, 64, 3)
  z = model.sample(jax.random.PRNGKey(1), 3, steps=1, labels=np.array([0, 1, 2]), decode=False)
  assert z.shape == (3, 16, 16, 4)
  np.testing.assert_allclose(np.asarray(model.decode(z)), np.asarray(images), atol=1e-5)
  # The decoder divides by the scaling factor before decoding, in fmjax.load and in evaluation.
  vae = autoencoders.load(built['vae_dir'])
  np.testing.assert_allclose(vae.decode(np.asarray(z) / vae.scaling_factor), np.asarray(images),
                             atol=1e-4)
  from fmjax import sharding
  from fmjax.evaluation import evaluator
  np.testing.assert_allclose(evaluator.decoder(vae, sharding.local_mesh())(np.asarray(z)),
                             np.asarray(images), atol=1e-4)
  # Chunked sampling equals one call (noise by row), with decoding.
  np.testing.assert_allclose(model.sample(jax.random.PRNGKey(1), 3, steps=1,
                                          labels=np.array([0, 1, 2]), chunk_size=2),
                             np.asarray(images), atol=1e-5)


def test_statistics_of_another_crop_or_autoencoder_are_not_comparable():
  a = fid.Statistics(np.zeros(3), np.eye(3), {'crop': 'adm_center_crop_256', 'autoencoder': 'sha256:a'})
  with pytest.raises(ValueError, match='crop'):
    fid.fid(a, fid.Statistics(np.zeros(3), np.eye(3), {'crop': 'adm_center_crop_512'}))
  with pytest.raises(ValueError, match='autoencoder'):
    fid.fid(a, fid.Statistics(np.zeros(3), np.eye(3), {'autoencoder': 'sha256:b'}))
  assert fid.fid(a, fid.Statistics(np.ones(3), np.eye(3), {'crop': 'adm_center_crop_256'})) == pytest.approx(3.0)


def test_a_run_refuses_an_autoencoder_that_did_not_build_its_latents(built):
  other = str(built['tmp'] / 'other_vae')
  autoencoders.save(other, autoencoders.init(autoencoders.AutoencoderConfig(
      block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4),
      jax.random.PRNGKey(1)))
  config, workdir = _config(built, 'wrong_vae')
  config.autoencoder = other
  with pytest.raises(configs.ConfigError, match='not the autoencoder that encoded'):
    cli.run(config, workdir, 'train')
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))


def test_a_latent_run_without_an_autoencoder_stops_before_training(built):
  from fmjax.evaluation import assets
  config, workdir = _config(built, 'no_vae')
  config.autoencoder = ''
  with pytest.raises(assets.MissingFIDAssetsError, match='--config.autoencoder'):
    cli.run(config, workdir, 'train')
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))
