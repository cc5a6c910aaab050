"""Data pipelines and sharding by brute force: exact pixel normalization, each process's slice of
an image set (several processes: disjoint, covering, the rows an index computation says), the
latent draw's flip share and moments, toy targets from their config, and the FSDP axis rule."""

import math

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from fmjax import sharding
from fmjax.data import mnist5k, pipelines

from test_data import _mnist_config


def test_pixels_map_exactly_onto_minus_one_one():
  pixels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
  out = pipelines._normalize_images({'image': pixels, 'label': np.int64(7)}, num_classes=10)
  x = out['x1']
  assert x.dtype == np.float32 and x.shape == (16, 16, 1)
  assert x.flat[0] == -1.0 and x.flat[255] == 1.0   # exactly, not 0.996 or 1.0039
  # (2 v - 255) / 255 for every grey level v, to float32 rounding.
  np.testing.assert_allclose(x.ravel(), (2.0 * np.arange(256) - 255.0) / 255.0, rtol=0, atol=1.2e-7)
  assert out['labels'] == 7 and out['labels'].dtype == np.int32
  assert 'labels' not in pipelines._normalize_images({'image': pixels, 'label': 1}, num_classes=0)
  latent = np.array([[0.25, -3.5]], np.float64)   # pre-scaled latents pass through as float32
  passed = pipelines._normalize_images({'latent': latent}, num_classes=0)['x1']
  assert passed.dtype == np.float32
  np.testing.assert_array_equal(passed, latent.astype(np.float32))


def test_latent_draws_flip_half_the_time_with_the_stored_moments():
  """x1 = (mean + std eps) s from the image's moments or its flip's, 1/2 each (binomial bound)."""
  example = {'mean': np.array([1.0, -2.0], np.float32), 'std': np.array([0.5, 0.1], np.float32),
             'mean_flip': np.array([3.0, 4.0], np.float32),
             'std_flip': np.array([0.5, 0.1], np.float32), 'label': 2}
  rng = np.random.default_rng(0)
  scale, n = 0.18, 4000
  draws = [pipelines._draw_latent(example, rng, scale, num_classes=5) for _ in range(n)]
  x = np.stack([d['x1'] for d in draws]).astype(np.float64)
  assert draws[0]['x1'].dtype == np.float32 and draws[0]['labels'] == 2
  flipped = x[:, 1] / scale > 1.0          # -2 vs 4 with std 0.1: the second entry separates them
  assert abs(flipped.mean() - 0.5) < 5 * math.sqrt(0.25 / n)
  for mask, mean in ((flipped, example['mean_flip']), (~flipped, example['mean'])):
    np.testing.assert_allclose(x[mask].mean(0), scale * mean, atol=5 * scale * 0.5 / math.sqrt(mask.sum()))
    np.testing.assert_allclose(x[mask].std(0), scale * example['std'], rtol=5 / math.sqrt(2 * mask.sum()))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tfds')
  mnist5k.build(str(path))
  return str(path)




def _local_batches(data_dir, monkeypatch, batch_size, process, count, num_batches):
  """The first local batches process `process` of `count` reads (the process index and count
  faked; every process builds the same pipeline)."""
  monkeypatch.setattr(jax, 'process_index', lambda: process)
  monkeypatch.setattr(jax, 'process_count', lambda: count)
  source = pipelines.ImageSource(_mnist_config(data_dir, batch_size), None)
  return [next(source._iterator) for _ in range(num_batches)]


def test_each_process_reads_its_own_slice_of_the_image_stream(data_dir, monkeypatch):
  """3 processes, global batch 9 (3 rows each): process p's row j of batch k is element
  (3 k + j) * 3 + p of the one-process stream, so each global batch (the processes' rows in
  process order) holds stream elements 9k .. 9k + 8 once each: disjoint and covering."""
  count, batch, num_batches = 3, 9, 3
  local = batch // count
  stream = _local_batches(data_dir, monkeypatch, 1, 0, 1, batch * num_batches)
  stream_x = np.concatenate([b['x1'] for b in stream])
  stream_y = np.concatenate([b['labels'] for b in stream])
  assert stream_x.max() == 1.0 and stream_x.min() == -1.0   # white digits on black: exact ends
  seen = {}
  for p in range(count):
    batches = _local_batches(data_dir, monkeypatch, batch, p, count, num_batches)
    for k, b in enumerate(batches):
      assert b['x1'].shape == (local, 28, 28, 1)
      index = [(local * k + j) * count + p for j in range(local)]
      np.testing.assert_array_equal(b['x1'], stream_x[index])
      np.testing.assert_array_equal(b['labels'], stream_y[index])
      for j, i in enumerate(index):
        seen.setdefault(k, []).append(i)
  for k, indices in seen.items():
    assert sorted(indices) == list(range(batch * k, batch * (k + 1)))


def test_process_rows_of_a_one_process_mesh_are_the_whole_batch():
  assert pipelines.process_rows(12, sharding.make_mesh()) == (0, 12)


def test_toy_targets_from_their_config_fields():
  data = ml_collections.ConfigDict({'name': 'gmm', 'means': ((0.0, 1.0), (2.0, -1.0), (1.0, 1.0)),
                                    'stds': None, 'weights': None, 'seed': 0, 'num_components': 3,
                                    'dim': 2, 'scale': 1.0})
  gmm = pipelines.make_toy_target(data)
  np.testing.assert_allclose(gmm.stds, [0.3, 0.3, 0.3])
  np.testing.assert_allclose(np.asarray(gmm.weights) / np.sum(gmm.weights), [1 / 3] * 3, rtol=1e-6)
  data.stds, data.weights = (0.1, 0.2, 0.4), (1.0, 2.0, 5.0)
  gmm = pipelines.make_toy_target(data)
  np.testing.assert_allclose(gmm.stds, [0.1, 0.2, 0.4])
  np.testing.assert_allclose(np.asarray(gmm.weights) / np.sum(gmm.weights), [1 / 8, 2 / 8, 5 / 8], rtol=1e-6)
  gaussian = pipelines.make_toy_target(ml_collections.ConfigDict({'name': 'gaussian', 'dim': 3, 'scale': 1.7}))
  np.testing.assert_array_equal(gaussian.mean, np.zeros(3))
  np.testing.assert_allclose(gaussian.std, np.full(3, 1.7))


# ----------------------------------------------------------------------------- FSDP axis rule


def _hand_rule(shape, fsdp, min_size):
  """Shard the largest dimension that fsdp divides (the first of equal ones), if the array has
  at least min_size elements and fsdp > 1; else replicate."""
  if fsdp <= 1 or math.prod(shape) < min_size:
    return None
  best = None
  for i, n in enumerate(shape):
    if n % fsdp == 0 and (best is None or n > shape[best]):
      best = i
  return best


SHAPES = [(3, 8, 16), (12, 10), (10, 12), (6, 10), (8, 8), (4096,), (5, 7), (16, 2, 64), (64, 48),
          (2, 3, 4), (1000, 20), ()]


@pytest.mark.parametrize('fsdp, min_size', [(4, 64), (2, 1), (3, 100), (1, 0), (8, 1 << 20)])
def test_fsdp_shards_the_largest_divisible_dimension_of_big_arrays(fsdp, min_size):
  for shape in SHAPES:
    dim = _hand_rule(shape, fsdp, min_size)
    want = P() if dim is None else P(*[sharding.FSDP if i == dim else None for i in range(len(shape))])
    assert sharding.partition_spec(shape, fsdp, min_size) == want, (shape, fsdp, min_size)


def test_state_shardings_follow_the_rule_on_a_data_fsdp_mesh():
  mesh = AbstractMesh((2, 4), (sharding.DATA, sharding.FSDP))
  tree = {'kernel': jax.ShapeDtypeStruct((12, 40), np.float32),
          'bias': jax.ShapeDtypeStruct((40,), np.float32),
          'odd': jax.ShapeDtypeStruct((9, 7), np.float32)}
  got = sharding.state_shardings(tree, mesh, min_size=30)
  assert got['kernel'].spec == P(None, sharding.FSDP)    # 40 > 12, both divisible by 4
  assert got['bias'].spec == P(sharding.FSDP)
  assert got['odd'].spec == P()                          # neither 9 nor 7 divisible by 4
  assert sharding.batch_sharding(mesh).spec == P((sharding.DATA, sharding.FSDP))


def test_local_batch_must_split_over_devices():
  n = jax.device_count()
  assert sharding.local_batch_size(6 * n) == 6 * n // jax.process_count()
  if n > 1:
    with pytest.raises(ValueError, match='multiple'):
      sharding.local_batch_size(n + 1)
  with pytest.raises(ValueError, match='must divide'):
    sharding.make_mesh(fsdp=n + 1)


@pytest.mark.parametrize('env, detected', [
    ({}, False), ({'SLURM_NTASKS': '1'}, False), ({'SLURM_NTASKS': '4'}, True),
    ({'OMPI_COMM_WORLD_SIZE': '2'}, True), ({'TPU_WORKER_HOSTNAMES': 'a'}, False),
    ({'TPU_WORKER_HOSTNAMES': 'a,b'}, True)])
def test_multi_host_launchers_are_detected_from_their_environment(env, detected, monkeypatch):
  for name in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert sharding._auto_detectable_cluster() is detected


def test_the_newest_prepared_version_is_read_and_work_folders_are_not(tmp_path):
  for version, info in (('1.0.0', True), ('1.10.0', True), ('1.9.9', True), ('2.0.0', False),
                        ('3.0.0.fmjax_partial', True)):
    (tmp_path / version).mkdir()
    if info:
      (tmp_path / version / 'dataset_info.json').write_text('{}')
  assert pipelines.prepared_version(str(tmp_path)) == str(tmp_path / '1.10.0')   # 10 > 9, numerically
  assert pipelines.prepared_version(str(tmp_path / 'missing')) is None
  assert 'fmjax.data.mnist5k' in pipelines.how_to_prepare('mnist5k', '/d')
  latent = pipelines.how_to_prepare('cifar10_latents', '/d')
  assert '--source=tfds:cifar10' in latent and '--name=cifar10_latents' in latent
  assert pipelines.how_to_prepare('svhn', '/d') is None
