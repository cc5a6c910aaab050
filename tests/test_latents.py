import numpy as np
import pytest

from fmjax.data import latents, pipelines


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


def test_bad_shards_say_what_a_shard_must_hold(tmp_path):
  np.savez(tmp_path / 'nchw.npz', latents=np.zeros((2, 4, 32, 32), np.float32), labels=np.zeros(2))
  with pytest.raises(ValueError, match='channels first'):
    latents.read_shard(str(tmp_path / 'nchw.npz'))
  np.savez(tmp_path / 'nolabels.npz', latents=np.zeros((2, 32, 32, 4), np.float32))
  with pytest.raises(ValueError, match='labels'):
    latents.read_shard(str(tmp_path / 'nolabels.npz'))
  with pytest.raises(pipelines.DatasetNotFoundError, match='fmjax.data.latents'):
    pipelines.find_prepared('imagenet256_latents', str(tmp_path / 'empty'))
