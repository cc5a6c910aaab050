"""FID plumbing: provenance that refuses every incomparable pair, statistics streamed over uneven
batches equal to one-shot numpy, the quantization to uint8, the image sweep's FID by hand over
padded batches, and its progress line (main process only)."""

import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import logging_utils
from fmjax.evaluation import fid, resize, sweep, sweep_samplers

# Written out, not read from fid.COMPARABLE_FIELDS: dropping a field there must fail here.
FIELDS = {'feature_extractor': ('inception_a', 'inception_b'),
          'resize': ('tf1_bilinear_align_corners_false_299', 'pil_bicubic_299'),
          'crop': ('adm_center_256', 'none'),
          'autoencoder': ('sha256=aaa', 'sha256=bbb')}


def _stats(rng, **provenance):
  return fid.statistics(rng.normal(size=(40, 3)), dataset='d', split='s', **provenance)


@pytest.mark.parametrize('field', sorted(FIELDS))
def test_each_provenance_mismatch_makes_statistics_not_comparable(field):
  rng = np.random.default_rng(1)
  a, b = FIELDS[field]
  common = {f: v[0] for f, v in FIELDS.items() if f != field}
  x, y = _stats(rng, **common, **{field: a}), _stats(rng, **common, **{field: b})
  with pytest.raises(ValueError, match=f'differ in {field}'):
    fid.fid(x, y)
  assert np.isfinite(fid.fid(x, y, check_provenance=False))
  # The same value, or a field only one side records, compares.
  same = _stats(rng, **common, **{field: a})
  expected = fid.frechet_distance(x.mu, x.sigma, same.mu, same.sigma)
  assert fid.fid(x, same) == pytest.approx(expected)
  assert np.isfinite(fid.fid(x, _stats(rng, **common)))


def test_the_tf_graph_and_its_port_are_one_extractor_but_others_are_not():
  rng = np.random.default_rng(2)
  ported = _stats(rng, feature_extractor=fid.extractor_id())
  graph = _stats(rng, feature_extractor=fid.TF_GRAPH_EXTRACTOR_ID)
  assert np.isfinite(fid.fid(ported, graph))
  with pytest.raises(ValueError, match='feature_extractor'):
    fid.fid(graph, _stats(rng, feature_extractor='inception_pytorch'))


def test_streaming_statistics_over_uneven_and_empty_batches_equal_numpy():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(37, 5)) @ rng.normal(size=(5, 5)) + 50.0
  acc = fid.FeatureStats(5)
  for start, stop in ((0, 1), (1, 1), (1, 12), (12, 13), (13, 37)):   # sizes 1, 0, 11, 1, 24
    acc.update(x[start:stop])
  assert acc.count == 37
  np.testing.assert_allclose(acc.mean, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(acc.cov, np.cov(x, rowvar=False, ddof=1), rtol=1e-9)
  stats = fid.statistics(acc, dataset='d', split='s')
  assert stats.count == 37
  one_shot = fid.statistics(x)
  np.testing.assert_allclose(one_shot.sigma, np.cov(x, rowvar=False), rtol=1e-9)
  with pytest.raises(ValueError, match=r'features \[n, 5\]'):
    acc.update(x[:, :4])


def test_pixels_quantize_and_grayscale_becomes_three_equal_channels():
  images = np.array([-1.0, -0.99, 0.0, 0.5, 1.0, 1.3], np.float32).reshape(1, 2, 3, 1)
  got = sweep.to_rgb_uint8(images)
  # (x + 1) * 127.5 rounded: -1 -> 0, -0.99 -> 1.275 -> 1, 0 -> 127.5 -> 128 (ties to even), 0.5 ->
  # 191.25 -> 191, 1 -> 255, and 1.3 clipped to 255.
  expected = np.array([0, 1, 128, 191, 255, 255], np.uint8).reshape(1, 2, 3)
  assert got.dtype == np.uint8 and got.shape == (1, 2, 3, 3)
  for c in range(3):
    np.testing.assert_array_equal(got[..., c], expected)
  with pytest.raises(ValueError, match='channels'):
    sweep.to_rgb_uint8(np.zeros((1, 2, 2, 4), np.float32))


def _sweep_inputs(num_samples=23, batch=5):
  specs = sweep_samplers.specs((1, 2), 'euler', ())
  # A 'sampler' whose k-step output is x0 * k / 4 (images in [-1, 1] after clipping).
  fns = {spec: (lambda k: lambda params, x0, labels: jnp.clip(x0 * k / 4, -1, 1))(spec.steps)
         for spec in specs}
  noise = lambda: sweep.noise_batches(jax_key(), (2, 2, 1), num_samples, batch)
  w = np.random.default_rng(4).normal(size=(12, 3))
  feature_fn = lambda images: np.asarray(images, np.float64).reshape(len(images), -1) / 255.0 @ w
  reference = fid.statistics(np.random.default_rng(5).normal(size=(50, 3)), dataset='d', split='s')
  return specs, fns, noise, feature_fn, reference


def jax_key():
  import jax
  return jax.random.PRNGKey(8)


def test_image_sweep_fid_by_hand_over_padded_batches():
  """23 samples in batches of 5: the padding rows of the last batch are dropped; the FID is
  numpy's Frechet distance of the features of the 23 quantized samples."""
  specs, fns, noise, feature_fn, reference = _sweep_inputs()
  results, kept = sweep.image_sweep(fns, None, noise, feature_fn, reference, 23, keep=6)
  for spec in specs:
    images = np.concatenate([np.asarray(fns[spec](None, x0, None))[:v] for x0, _, v in noise()])
    assert len(images) == 23
    features = feature_fn(sweep.to_rgb_uint8(images))
    want = fid.frechet_distance(features.mean(0), np.cov(features, rowvar=False),
                                reference.mu, reference.sigma)
    row = results['few_step'][spec.key]
    assert row['num_samples'] == 23 and row['nonfinite'] == 0 and row['nfe'] == spec.steps
    assert row['fid'] == pytest.approx(want, rel=1e-6)
    np.testing.assert_array_equal(kept[spec], images[:6])
  assert results['fid_num_samples'] == 23


def test_fid_progress_line_counts_samples_and_rate_on_the_main_process_only(monkeypatch):
  specs, fns, noise, feature_fn, reference = _sweep_inputs()
  lines = []
  sweep.image_sweep(fns, None, noise, feature_fn, reference, 23, progress=lines.append,
                    progress_every=0.0)
  assert len(lines) == 2 * 5   # every batch of both samplers
  for spec, chunk in zip(specs, (lines[:5], lines[5:])):
    for line, done in zip(chunk, (5, 10, 15, 20, 23)):
      assert line.startswith(f'  {spec.label}: {done}/23 samples ('), line
      assert line.endswith(' images/s') and float(line.split(', ')[-1].split()[0]) > 0
  # A long interval: only each sampler's last batch is reported.
  lines.clear()
  sweep.image_sweep(fns, None, noise, feature_fn, reference, 23, progress=lines.append,
                    progress_every=1e9)
  assert [l.split(': ')[1].split()[0] for l in lines] == ['23/23', '23/23']
  # Other processes print nothing.
  monkeypatch.setattr(logging_utils, 'is_main_process', lambda: False)
  lines.clear()
  sweep.image_sweep(fns, None, noise, feature_fn, reference, 23, progress=lines.append,
                    progress_every=0.0)
  assert lines == []
  assert sweep.progress_line('flow map, 1 step', 50, 200, 2.0) == \
      '  flow map, 1 step: 50/200 samples (25 %), 25.0 images/s'


def test_resize_mode_is_recorded_in_computed_statistics():
  rng = np.random.default_rng(6)
  images = rng.integers(0, 256, (9, 4, 4, 3), dtype=np.uint8)
  params = {'w': rng.normal(size=(48, 4)).astype(np.float32)}
  extractor = fid.FeatureExtractor(params, batch_size=4, feature_fn=lambda p, x: (
      x.astype(jnp.float32).reshape(x.shape[0], -1) / 255.0) @ p['w'])
  stats = fid.compute_statistics(extractor, [images[:5], images[5:]], None, dataset='d', split='s')
  assert stats.provenance['resize'] == resize.RESIZE_MODE and stats.count == 9
  assert 'feature_extractor' not in stats.provenance   # not the Inception network: not claimed
  features = (images.astype(np.float64).reshape(9, -1) / 255.0) @ params['w']
  np.testing.assert_allclose(stats.mu, features.mean(0), rtol=1e-5)
