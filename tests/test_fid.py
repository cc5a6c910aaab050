"""Fréchet distance, streaming statistics, provenance, and features gathered over devices/hosts."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg

from fmjax.evaluation import fid

HERE = os.path.dirname(__file__)


def random_cov(rng, d, rank=None):
  a = rng.normal(size=(d, rank or d))
  return a @ a.T / (rank or d) + (0 if rank else 0.1 * np.eye(d))


def test_commuting_diagonal_closed_form():
  # Diagonal covariances commute: tr sqrt(S1 S2) = sum sqrt(a_i b_i), so
  # d^2 = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
  rng = np.random.default_rng(0)
  a, b = rng.uniform(0.1, 3, 50), rng.uniform(0.1, 3, 50)
  mu1, mu2 = rng.normal(size=50), rng.normal(size=50)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
  assert got == pytest.approx(expected, rel=1e-10)


def test_scaled_covariance_closed_form():
  # N(0, S) vs N(0, c^2 S) for a full (non-diagonal) S: d^2 = (1 - c)^2 tr(S).
  rng = np.random.default_rng(1)
  s = random_cov(rng, 40)
  got = fid.frechet_distance(np.zeros(40), s, np.zeros(40), 2.25 * s)
  assert got == pytest.approx(0.25 * np.trace(s), rel=1e-9)


def test_non_commuting_vs_scipy_sqrtm():
  rng = np.random.default_rng(2)
  s1, s2 = random_cov(rng, 64), random_cov(rng, 64)
  mu1, mu2 = rng.normal(size=64), rng.normal(size=64)
  root = scipy.linalg.sqrtm(s1 @ s2)
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root.real)
  assert abs(np.trace(root.imag)) < 1e-8  # well-conditioned: sqrtm is a valid reference here
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  assert got == pytest.approx(expected, rel=1e-9)
  assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-9)  # symmetric


def test_singular_covariances_real_and_exact():
  # Fewer samples than dimensions (as with < 2048 images): both covariances are singular.
  # Exact reference: tr sqrt(S1 S2) = nuclear norm of Xc Yc^T / sqrt((n1 - 1)(n2 - 1)).
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(30, 100)), rng.normal(size=(40, 100)) + 0.3
  s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  xc, yc = x - x.mean(0), y - y.mean(0)
  nuclear = np.linalg.svd(xc @ yc.T / np.sqrt(29 * 39), compute_uv=False).sum()
  expected = (np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(s1) + np.trace(s2) - 2 * nuclear)
  got = fid.frechet_distance(x.mean(0), s1, y.mean(0), s2)
  assert isinstance(got, float) and np.isfinite(got)
  assert got == pytest.approx(expected, rel=1e-7)


def test_fid_of_a_set_with_itself_is_zero():
  rng = np.random.default_rng(4)
  for n, d in ((2000, 64), (50, 128)):  # full-rank, then singular covariance
    stats = fid.statistics(rng.normal(size=(n, d)) * 2 + 1, dataset='toy', split='x')
    value = fid.fid(stats, stats)
    assert abs(value) < 1e-6 * np.trace(stats.sigma), (n, d, value)


def test_streaming_stats_match_numpy_even_with_large_offset():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(1000, 16)) * 0.01 + 1e4  # one-pass sums without a shift lose digits here
  acc = fid.FeatureStats(16)
  for chunk in np.array_split(x, 7):
    acc.update(chunk)
  assert acc.count == 1000
  np.testing.assert_allclose(acc.mean, x.mean(0), rtol=1e-14)
  np.testing.assert_allclose(acc.cov, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-12)
  with pytest.raises(ValueError, match='non-finite'):
    acc.update(np.full((1, 16), np.nan))


def test_statistics_provenance_round_trip(tmp_path):
  rng = np.random.default_rng(6)
  stats = fid.statistics(rng.normal(size=(100, 8)), dataset='cifar10', split='train',
                         resize='tf1_bilinear_align_corners_false_299', feature_extractor='f:1')
  path = str(tmp_path / 'ref.npz')
  fid.save_statistics(path, stats)
  loaded = fid.load_statistics(path)
  np.testing.assert_array_equal(loaded.mu, stats.mu)
  np.testing.assert_array_equal(loaded.sigma, stats.sigma)
  assert loaded.provenance == {'dataset': 'cifar10', 'split': 'train', 'count': 100,
                               'resize': 'tf1_bilinear_align_corners_false_299',
                               'feature_extractor': 'f:1'}
  other = fid.Statistics(stats.mu, stats.sigma, dict(stats.provenance, feature_extractor='f:2'))
  with pytest.raises(ValueError, match='not comparable'):
    fid.fid(loaded, other)
  np.savez(str(tmp_path / 'legacy.npz'), mu=stats.mu, sigma=stats.sigma)  # TTUR-style file
  with pytest.raises(ValueError, match='no provenance'):
    fid.load_statistics(str(tmp_path / 'legacy.npz'))
  legacy = fid.load_statistics(str(tmp_path / 'legacy.npz'), allow_missing_provenance=True)
  assert abs(fid.fid(legacy, loaded)) < 1e-9
  with pytest.raises(ValueError, match='lacks'):
    fid.save_statistics(path, fid.statistics(rng.normal(size=(10, 8)), dataset='x'))


def fake_features(params, images):
  """A cheap stand-in for Inception: per-channel means and a fixed projection of the pixels."""
  x = images.astype('float32') / 255.0
  flat = x.reshape(x.shape[0], -1)
  return flat @ params['w']


def test_extractor_pads_compiles_once_and_truncates():
  rng = np.random.default_rng(7)
  images = rng.integers(0, 256, (23, 4, 4, 3), dtype=np.uint8)
  params = {'w': rng.normal(size=(48, 6)).astype(np.float32)}
  extractor = fid.FeatureExtractor(params, batch_size=8, feature_fn=fake_features)
  batches = [images[:10], images[10:13], images[13:]]  # uneven, some larger than the batch
  stats = fid.compute_statistics(extractor, batches, num_samples=21, dataset='toy', split='s')
  expected = np.asarray(fake_features(params, images[:21]), np.float64)
  np.testing.assert_allclose(stats.mu, expected.mean(0), rtol=1e-5)
  np.testing.assert_allclose(stats.sigma, np.cov(expected, rowvar=False), rtol=1e-4, atol=1e-6)
  assert stats.count == 21 and stats.provenance['resize'] == 'tf1_bilinear_align_corners_false_299'
  assert extractor.num_traces == 1
  with pytest.raises(ValueError, match='ran out after 23'):
    fid.compute_statistics(extractor, batches, num_samples=30)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_sharded_multiprocess_features_match_single_process(tmp_path):
  """2 JAX processes x 4 CPU devices, batch sharded over an 8-device 'data' axis: the gathered
  statistics equal those of all images on one host (uneven last batches included)."""
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE)] + sys.path),
             JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=4')
  env.pop('JAX_NUM_CPU_DEVICES', None)
  worker = os.path.join(HERE, 'fid_multiprocess_worker.py')
  procs = [subprocess.Popen([sys.executable, worker, str(i), '2', str(port), str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  outputs = []
  for p in procs:
    out, _ = p.communicate(timeout=240)
    outputs.append(out.decode()[-3000:])
  assert all(p.returncode == 0 for p in procs), '\n'.join(outputs)
  results = [np.load(tmp_path / f'stats_{i}.npz') for i in range(2)]
  all_images, params = results[0]['all_images'], {'w': results[0]['w']}
  expected = np.asarray(fake_features(params, all_images), np.float64)
  for r in results:  # every host holds the statistics of all hosts' images
    assert int(r['count']) == len(all_images) == 26
    np.testing.assert_allclose(r['mu'], expected.mean(0), rtol=1e-5)
    np.testing.assert_allclose(r['sigma'], np.cov(expected, rowvar=False), rtol=1e-4, atol=1e-6)
    assert int(r['num_traces']) == 1 and int(r['num_devices']) == 8


def test_source_batches_cover_each_example_once_over_hosts():
  from fmjax.evaluation import reference_stats
  source = [{'image': np.full((2, 2, 1), i, np.uint8)} for i in range(11)]  # grayscale
  per_host = [list(reference_stats.source_batches(source, 10, 2, process_index=p, process_count=3))
              for p in range(3)]
  assert [len(b) for b in per_host] == [2, 2, 2]  # same number of (collective) batches each
  seen = sorted(int(img[0, 0, 0]) for batches in per_host for b in batches for img in b)
  assert seen == list(range(10))
  assert per_host[0][0].shape == (2, 2, 2, 3) and per_host[2][1].shape[0] == 1
  with pytest.raises(ValueError, match='num_samples 12 > 11'):
    next(reference_stats.source_batches(source, 12, 2))


def test_reference_statistics_end_to_end_with_fake_network(tmp_path):
  from fmjax.evaluation import reference_stats
  rng = np.random.default_rng(8)
  source = [{'image': rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)} for _ in range(9)]
  params = {'w': rng.normal(size=(48, 6)).astype(np.float32)}
  extractor = fid.FeatureExtractor(params, batch_size=4, feature_fn=fake_features)
  batches = reference_stats.source_batches(source, 9, extractor.local_batch)
  stats = fid.compute_statistics(extractor, batches, 9, dataset='fake', split='train',
                                 feature_extractor='fake')
  fid.save_statistics(str(tmp_path / 's.npz'), stats)
  images = np.stack([s['image'] for s in source])
  expected = np.asarray(fake_features(params, images), np.float64)
  np.testing.assert_allclose(fid.load_statistics(str(tmp_path / 's.npz')).mu, expected.mean(0),
                             rtol=1e-5)
