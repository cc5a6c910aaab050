"""Evaluation parity with the papers' protocol: reference-batch layouts, precision/recall,
Inception Score, and the float -> uint8 rule. Each against a plain, independent computation."""

import numpy as np
import pytest
import scipy.spatial.distance

from fmjax.evaluation import fid, inception_score, precision_recall, reference_batches, resize


# ------------------------------------------------------------------ float -> uint8


def test_to_uint8_round_and_floor_by_hand():
  x = np.array([-1.5, -1.0, -0.999, 0.0, 0.5, 0.99, 1.0, 1.2], np.float32)
  # p = (x + 1) * 127.5: -63.75, 0, 0.1275, 127.5, 191.25, 253.7325, 255, 280.5
  np.testing.assert_array_equal(np.asarray(resize.to_uint8(x)),
                                [0, 0, 0, 128, 191, 254, 255, 255])  # 127.5 -> 128 (ties to even)
  np.testing.assert_array_equal(np.asarray(resize.to_uint8(x, rounding='floor')),
                                [0, 0, 0, 127, 191, 253, 255, 255])
  # Another range: [0, 1] -> p = 255 x.
  np.testing.assert_array_equal(
      np.asarray(resize.to_uint8(np.array([0.2, 0.5]), (0.0, 1.0))), [51, 128])
  # Exact ties go to the even neighbour (jnp.round), not up: 126.5 -> 126, 127.5 -> 128.
  np.testing.assert_array_equal(
      np.asarray(resize.to_uint8(np.array([126.5, 127.5]), (0.0, 255.0))), [126, 128])
  with pytest.raises(ValueError, match='rounding'):
    resize.to_uint8(x, rounding='trunc')


def test_to_uint8_matches_edm_and_adm_formulas():
  # EDM: (x * 127.5 + 128).clip(0, 255) then truncation; ADM: ((x + 1) * 127.5).clip then
  # truncation. Written here in numpy, on random floats (no exact .5 ties in float64 draws).
  x = np.random.default_rng(0).uniform(-1.2, 1.2, 5000)
  edm = np.trunc(np.clip(x * 127.5 + 128, 0, 255)).astype(np.uint8)
  adm = np.trunc(np.clip((x + 1) * 127.5, 0, 255)).astype(np.uint8)
  x32 = x.astype(np.float32)
  assert np.array_equal(np.asarray(resize.to_uint8(x32)), edm)
  assert np.array_equal(np.asarray(resize.to_uint8(x32, rounding='floor')), adm)
  inner = np.abs(x) < 0.99
  assert np.mean(edm[inner].astype(float) - adm[inner]) == pytest.approx(0.5, abs=0.03)


# ------------------------------------------------------------------ precision / recall


def brute_precision_recall(real, fake, k):
  """Eq. 1-2 of arXiv 1904.06991 with scipy's pairwise distances and a full sort."""
  def radii(x):
    d = scipy.spatial.distance.cdist(x, x)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself
  def inside(points, centers, r):
    d = scipy.spatial.distance.cdist(points, centers)
    return np.mean([any(d[i, j] <= r[j] for j in range(len(centers))) for i in range(len(points))])
  return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def test_precision_recall_vs_brute_force():
  rng = np.random.default_rng(1)
  real = rng.normal(size=(120, 16))
  fake = rng.normal(size=(90, 16)) * 1.1 + 0.6   # overlapping, different spread: 0 < P, R < 1
  got = precision_recall.precision_recall(real, fake, k=3, block=37)  # blocks not dividing n
  p, r = brute_precision_recall(real, fake, 3)
  assert 0.05 < p < 0.95 and 0.05 < r < 0.95
  assert got['precision'] == pytest.approx(p, abs=1e-12)
  assert got['recall'] == pytest.approx(r, abs=1e-12)
  assert (got['k'], got['num_real'], got['num_fake']) == (3, 120, 90)
  for k in (1, 5):
    got = precision_recall.precision_recall(real, fake, k=k)
    assert (got['precision'], got['recall']) == pytest.approx(brute_precision_recall(real, fake, k))


def test_precision_recall_exact_cases():
  # On a 1-d grid 0, 1, ..., 9 the 3rd neighbour of an interior point is at distance 2
  # (and 3 at the ends); points at 0.5 + i are covered, 30 is not, 12 lies on the ball of 9
  # (closed balls: d <= radius counts).
  grid = np.arange(10.0)[:, None]
  np.testing.assert_allclose(precision_recall.manifold_radii(grid, 3),
                             [3, 2, 2, 2, 2, 2, 2, 2, 2, 3])
  assert precision_recall.coverage_fraction(np.array([[0.5], [4.5], [30.0], [12.0]]), grid,
                                            precision_recall.manifold_radii(grid, 3)) == 3 / 4
  # A set against itself: every point is inside its own ball (P = R = 1).
  x = np.random.default_rng(2).normal(size=(40, 8))
  got = precision_recall.precision_recall(x, x)
  assert got['precision'] == got['recall'] == 1.0
  # Mode collapse: fakes on one real point -> precision 1, recall tiny.
  fake = x[:1] + 1e-3 * np.random.default_rng(3).normal(size=(20, 8))
  got = precision_recall.precision_recall(x, fake)
  assert got['precision'] == 1.0 and got['recall'] <= 2 / 40
  with pytest.raises(ValueError, match='k = 3'):
    precision_recall.manifold_radii(x[:3], 3)
  with pytest.raises(ValueError, match='non-finite'):
    precision_recall.precision_recall(x, np.full((5, 8), np.nan))


# ------------------------------------------------------------------ Inception Score


def test_inception_score_vs_plain_formula():
  rng = np.random.default_rng(4)
  features = rng.normal(size=(23, 12))
  w = rng.normal(size=(12, 7))
  probs = inception_score.class_probabilities(features, w)
  logits = features @ w
  expected_p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  np.testing.assert_allclose(probs, expected_p, rtol=1e-12)
  def plain_is(p):
    py = p.mean(0)
    return np.exp(np.mean([np.sum(q * np.log(q / py)) for q in p]))
  # Splits of 10: chunks [0:10], [10:20], [20:23], averaged (the ADM evaluator's rule).
  expected = np.mean([plain_is(probs[0:10]), plain_is(probs[10:20]), plain_is(probs[20:23])])
  assert inception_score.inception_score(probs, split_size=10) == pytest.approx(expected, rel=1e-12)
  assert inception_score.inception_score(probs, 100) == pytest.approx(plain_is(probs), rel=1e-12)


def test_inception_score_exact_cases():
  # Confident and uniformly spread over C classes: IS = C. All the same class: IS = 1.
  onehot = np.eye(5)[np.arange(50) % 5]
  assert inception_score.inception_score(onehot) == pytest.approx(5.0, rel=1e-12)
  assert inception_score.inception_score(np.tile(np.eye(5)[2], (50, 1))) == pytest.approx(1.0)
  assert inception_score.inception_score(np.full((30, 4), 0.25)) == pytest.approx(1.0)
  with pytest.raises(ValueError, match='probabilities'):
    inception_score.inception_score(np.ones((3, 4)))


# ------------------------------------------------------------------ reference layouts


def fake_features(images):
  x = np.asarray(images, np.float64) / 255.0
  return np.stack([x.mean((1, 2, 3)), x[..., 0].std((1, 2)), x[:, :2, :2].mean((1, 2, 3))], 1)


def test_adm_batch_with_and_without_stats(tmp_path):
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, (11, 6, 5, 3), dtype=np.uint8)
  path = str(tmp_path / 'ref_images.npz')
  np.savez(path, arr_0=images)
  ref = reference_batches.read_reference(path)
  assert (ref.layout, ref.num_images, ref.image_shape, ref.stats) == ('adm', 11, (11, 6, 5, 3),
                                                                        None)
  batches = list(ref.image_batches(4))
  assert [len(b) for b in batches] == [4, 4, 3]
  np.testing.assert_array_equal(np.concatenate(batches), images)  # streamed bytes = the array
  feats = reference_batches.reference_features(ref, fake_features, batch_size=4)
  np.testing.assert_allclose(feats, fake_features(images), rtol=1e-12)
  stats = reference_batches.reference_statistics(ref, feats)
  np.testing.assert_allclose(stats.mu, feats.mean(0), rtol=1e-12)
  np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), rtol=1e-9)
  # With mu/sigma (and sFID keys) in the file, FID uses those, as the ADM evaluator does.
  mu, sigma = rng.normal(size=3), np.eye(3) * 2
  path2 = str(tmp_path / 'ref_stats.npz')
  np.savez_compressed(path2, arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=np.eye(2))
  ref2 = reference_batches.read_reference(path2)
  assert ref2.layout == 'adm' and 'mu_s' in ref2.keys
  np.testing.assert_array_equal(reference_batches.reference_statistics(ref2, feats).mu, mu)
  np.testing.assert_array_equal(np.concatenate(list(ref2.image_batches(5, 7))), images[:7])
  # The TF-graph statistics compare with fmjax's own extractor, not with another network.
  ours = fid.statistics(feats, dataset='x', split='y', resize=resize.RESIZE_MODE,
                        feature_extractor=fid.extractor_id())
  expected = fid.frechet_distance(mu, sigma, ours.mu, ours.sigma)
  assert fid.fid(ref2.stats, ours) == pytest.approx(expected)
  for name in ('clip', 'inception_fid_tf2015:sha256=0123'):  # other network / other weights
    other = fid.Statistics(ours.mu, ours.sigma, dict(ours.provenance, feature_extractor=name))
    with pytest.raises(ValueError, match='not comparable'):
      fid.fid(ref2.stats, other)


def test_fmjax_and_ttur_layouts_and_bad_files(tmp_path):
  rng = np.random.default_rng(6)
  stats = fid.statistics(rng.normal(size=(30, 4)), dataset='d', split='s',
                         resize=resize.RESIZE_MODE, feature_extractor=fid.extractor_id())
  fid.save_statistics(str(tmp_path / 'own.npz'), stats)
  own = reference_batches.read_reference(str(tmp_path / 'own.npz'))
  assert own.layout == 'fmjax' and own.num_images == 0 and own.stats.provenance['count'] == 30
  with pytest.raises(ValueError, match='no images'):
    next(own.image_batches(4))
  np.savez(str(tmp_path / 'ttur.npz'), mu=stats.mu, sigma=stats.sigma)
  ttur = reference_batches.read_reference(str(tmp_path / 'ttur.npz'))
  assert ttur.layout == 'ttur' and abs(fid.fid(ttur.stats, own.stats)) < 1e-9
  np.savez(str(tmp_path / 'float.npz'), arr_0=np.zeros((2, 4, 4, 3), np.float32))
  with pytest.raises(ValueError, match='uint8'):
    reference_batches.read_reference(str(tmp_path / 'float.npz'))
  np.savez(str(tmp_path / 'other.npz'), x=np.zeros(3))
  with pytest.raises(ValueError, match='no reference layout'):
    reference_batches.read_reference(str(tmp_path / 'other.npz'))


def test_evaluate_batches_like_the_adm_evaluator(tmp_path):
  rng = np.random.default_rng(7)
  ref_images = rng.integers(0, 256, (30, 4, 4, 3), dtype=np.uint8)
  sample_images = np.clip(rng.integers(0, 256, (25, 4, 4, 3)) * 0.8 + 20, 0, 255).astype(np.uint8)
  np.savez(str(tmp_path / 'ref.npz'), arr_0=ref_images)
  np.savez(str(tmp_path / 'samples.npz'), arr_0=sample_images, arr_1=np.arange(25))
  got = reference_batches.evaluate_batches(str(tmp_path / 'ref.npz'), str(tmp_path / 'samples.npz'),
                                           fake_features, batch_size=7)
  fr, fs = fake_features(ref_images), fake_features(sample_images)
  expected_fid = scipy_fid(fr, fs)
  p, r = brute_precision_recall(fr, fs, 3)
  assert got['fid'] == pytest.approx(expected_fid, rel=1e-8)
  assert (got['precision'], got['recall']) == pytest.approx((p, r))
  assert (got['num_reference'], got['num_samples'], got['fid_reference_stats']) == (
      30, 25, 'arr_0 features')


def scipy_fid(a, b):
  """The TTUR/ADM formula with scipy.linalg.sqrtm (well-conditioned here)."""
  import scipy.linalg
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  root = scipy.linalg.sqrtm(s1 @ s2).real
  return np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * root)
