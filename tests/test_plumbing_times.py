"""Time samplers and row drawing of the training rules, against closed forms and brute-force counts.

Every check runs at a non-degenerate setting (logit-normal with mean != 0 and std != 1, label
dropout measured as a share, odd batch sizes and fractions whose products are not integers) and
its tolerance is derived from the sample size: a Kolmogorov-Smirnov bound for the laws, a
binomial standard deviation for shares.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from fmjax import interpolants
from fmjax.losses import base, times

N = 20_000
# Kolmogorov-Smirnov: P(sup |F_n - F| > sqrt(log(2 / a) / (2 n))) <= a (DKW inequality); a = 1e-6.
KS_BOUND = math.sqrt(math.log(2 / 1e-6) / (2 * N))


def logit_normal_cdf(u, mean, std):
  """P(sigmoid(mean + std Z) <= u) = Phi((logit(u) - mean) / std)."""
  u = np.asarray(u, np.float64)
  return stats.norm.cdf((special.logit(u) - mean) / std)


def ks_distance(samples, cdf):
  """sup_u |F_n(u) - F(u)| of an empirical law against a continuous CDF (both one-sided gaps)."""
  x = np.sort(np.asarray(samples, np.float64))
  f = cdf(x)
  n = len(x)
  return max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n))


@pytest.mark.parametrize('mean, std', [(0.7, 1.6), (-0.4, 0.5)])
def test_logit_normal_follows_its_cdf_at_mean_and_std_not_zero_one(mean, std):
  dist = times.TimeDistribution('logit_normal', mean=mean, std=std, eps=1e-6)
  u = np.asarray(dist.sample(jax.random.PRNGKey(11), N))
  assert u.dtype == np.float32 and u.shape == (N,)
  assert ks_distance(u, lambda x: logit_normal_cdf(x, mean, std)) < KS_BOUND
  # The logits' moments: mean within 5 standard errors, std within 5 of its standard error.
  logits = special.logit(u.astype(np.float64))
  assert abs(logits.mean() - mean) < 5 * std / math.sqrt(N)
  assert abs(logits.std() - std) < 5 * std / math.sqrt(2 * N)


def test_the_logit_normal_is_clipped_to_eps_with_the_share_the_cdf_gives():
  """Samples below eps become eps: the share at eps is F(eps) (binomial bound, 5 sigma)."""
  mean, std, eps = 0.7, 3.0, 1e-3
  u = np.asarray(times.TimeDistribution('logit_normal', mean=mean, std=std, eps=eps)
                 .sample(jax.random.PRNGKey(12), N))
  p_low, p_high = logit_normal_cdf(eps, mean, std), 1 - logit_normal_cdf(1 - eps, mean, std)
  assert u.min() == np.float32(eps) and u.max() == np.float32(1 - eps)
  for share, p in ((np.mean(u == np.float32(eps)), p_low), (np.mean(u == np.float32(1 - eps)), p_high)):
    assert abs(share - p) < 5 * math.sqrt(p * (1 - p) / N), (share, p)


def test_uniform_times_follow_the_uniform_cdf():
  u = np.asarray(times.TimeDistribution('uniform', eps=1e-5).sample(jax.random.PRNGKey(13), N))
  assert ks_distance(u, lambda x: x) < KS_BOUND


def test_pairs_are_the_order_statistics_of_two_independent_draws():
  """s = min(a, b), t = max(a, b) of two independent draws: P(s <= u) = 1 - (1 - F)^2,
  P(t <= u) = F^2, and s, t are not the same draw (P(s = t) = 0)."""
  mean, std = -0.3, 0.8
  s, t = (np.asarray(a) for a in times.sample_pairs(
      jax.random.PRNGKey(14), N, times.TimeDistribution('logit_normal', mean=mean, std=std)))
  assert s.shape == t.shape == (N,) and np.all(s < t)
  cdf = lambda x: logit_normal_cdf(x, mean, std)
  assert ks_distance(s, lambda x: 1 - (1 - cdf(x)) ** 2) < KS_BOUND
  assert ks_distance(t, lambda x: cdf(x) ** 2) < KS_BOUND
  # Independence of the two draws: the rank correlation of (min, max) of two iid draws is 1/2 ...
  # here simply: the gap t - s has mean E|a - b| > 0 by a margin (a shared draw would give 0).
  assert np.mean(t - s) > 0.1


@pytest.mark.parametrize('num_levels', [1, 4, 7])
def test_dyadic_steps_tile_the_interval_at_every_level(num_levels):
  """Brute force over every (level k, start j): each jump [j h, (j + 1) h], h = 2^-k, k < levels,
  is drawn, none other, so the jumps of every level tile [0, 1] and the last ends at t = 1;
  levels are uniform and, within a level, the 2^k starts are uniform."""
  n = 40_000
  s, t = (np.asarray(a, np.float64) for a in times.sample_dyadic_steps(jax.random.PRNGKey(15), n, num_levels))
  h = t - s
  level = np.round(-np.log2(h)).astype(int)
  np.testing.assert_allclose(h, 2.0 ** -level, rtol=1e-6)
  j = np.round(s / h).astype(int)
  np.testing.assert_allclose(s, j * h, atol=1e-6)
  drawn = set(zip(level.tolist(), j.tolist()))
  expected = {(k, jj) for k in range(num_levels) for jj in range(2 ** k)}
  assert drawn == expected     # every cell of every level, and nothing outside [0, 1]
  for k in range(num_levels):   # some jump of every level ends at t = 1 (exactly)
    assert np.any((level == k) & (t == 1.0)), k
  level_share = np.bincount(level, minlength=num_levels) / n
  p = 1 / num_levels
  assert np.all(np.abs(level_share - p) <= 5 * math.sqrt(p * (1 - p) / n)), level_share
  k = num_levels - 1            # the finest level: its 2^k starts equally likely
  counts = np.bincount(j[level == k], minlength=2 ** k)
  m, q = counts.sum(), 1 / 2 ** k
  assert np.all(np.abs(counts / m - q) <= 5 * math.sqrt(q * (1 - q) / m)), counts


def test_unknown_time_distribution_names_the_choices():
  with pytest.raises(ValueError, match="'uniform' or 'logit_normal'"):
    times.TimeDistribution('lognormal')


# ----------------------------------------------------------------------------- row drawing


def _nearest_integer(x: float) -> int:
  """The integer closest to x, by brute force (x is never a half-integer below)."""
  return min(range(int(x) + 2), key=lambda k: abs(k - x))


@pytest.mark.parametrize('batch, fraction', [(7, 0.75), (9, 0.3), (13, 0.6), (11, 0.05), (5, 0.99)])
def test_diagonal_row_count_rounds_to_the_nearest_integer(batch, fraction):
  """num_diagonal and what a rule really splits: the first B - n rows off the diagonal, the last
  n = nearest integer to fraction * B on it."""
  n_diag = _nearest_integer(batch * fraction)
  assert base.num_diagonal(batch, fraction) == n_diag
  seen = {}

  def off_diagonal_fn(params, rows, key, step):
    seen['off'] = np.asarray(rows.x1[:, 0])
    z = jnp.zeros((rows.x1.shape[0],))
    return z, z, z, {}

  def diagonal_target(params, t, x_t, rows, prediction):
    seen['diag'] = np.asarray(rows.x1[:, 0])
    return prediction

  interp = interpolants.linear()

  class Map:
    velocity = staticmethod(lambda params, t, x, labels: x)

  options = base.CommonOptions(diagonal_fraction=fraction)
  loss_fn = base.two_part_rule(base.Context(Map, interp, None, options), off_diagonal_fn,
                               diagonal_target_fn=diagonal_target)
  x1 = jnp.arange(batch, dtype=jnp.float32)[:, None] * jnp.ones((1, 2))
  loss_fn({'net': None}, {'x1': x1}, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(seen.get('off', np.zeros(0)), np.arange(batch - n_diag))
  np.testing.assert_array_equal(seen.get('diag', np.zeros(0)), np.arange(batch - n_diag, batch))


def test_label_dropout_replaces_the_measured_share_by_the_null_label():
  """p = 0.3 of the labels become the null label (binomial bound, 5 sigma), the others keep their
  class; without dropout nothing changes; given noise x0 is used as is, else x0 ~ N(0, I)."""
  n, p, num_classes = 6001, 0.3, 7
  labels = jnp.arange(n, dtype=jnp.int32) % num_classes
  x1 = jnp.ones((n, 3), jnp.float32)
  options = base.CommonOptions(label_dropout=p, null_label=num_classes)
  rows, key = base.draw_rows({'x1': x1, 'labels': labels}, jax.random.PRNGKey(5), options)
  got = np.asarray(rows.labels)
  dropped = got == num_classes
  assert abs(dropped.mean() - p) < 5 * math.sqrt(p * (1 - p) / n), dropped.mean()
  np.testing.assert_array_equal(got[~dropped], np.asarray(labels)[~dropped])
  # Each class is dropped at the same rate (the mask does not depend on the label).
  per_class = [dropped[np.asarray(labels) == c].mean() for c in range(num_classes)]
  m = n / num_classes
  assert max(abs(r - p) for r in per_class) < 5 * math.sqrt(p * (1 - p) / m), per_class
  x0 = np.asarray(rows.x0)
  assert abs(x0.mean()) < 5 / math.sqrt(x0.size) and abs(x0.std() - 1) < 5 / math.sqrt(2 * x0.size)
  assert not np.array_equal(np.asarray(key), np.asarray(jax.random.PRNGKey(5)))
  kept, _ = base.draw_rows({'x1': x1, 'labels': labels, 'x0': 2 * x1}, jax.random.PRNGKey(5),
                           base.CommonOptions())
  np.testing.assert_array_equal(np.asarray(kept.labels), np.asarray(labels))
  np.testing.assert_array_equal(np.asarray(kept.x0), 2 * np.asarray(x1))
  with pytest.raises(ValueError, match='null_label'):
    base.CommonOptions(label_dropout=0.1)


def test_per_row_reductions_and_weighting_by_plain_numpy():
  rng = np.random.default_rng(3)
  err = rng.normal(size=(5, 3, 2)).astype(np.float32)
  ms = (err.astype(np.float64) ** 2).reshape(5, -1).mean(1)
  np.testing.assert_allclose(base.mean_square(jnp.asarray(err)), ms, rtol=1e-6)
  c = 0.3
  np.testing.assert_allclose(base.pseudo_huber(jnp.asarray(err), c), np.sqrt(ms + c * c) - c, rtol=1e-5)
  np.testing.assert_allclose(base.normalize_rows(jnp.asarray(err), c),
                             err / (np.sqrt(ms) + c)[:, None, None], rtol=1e-5)
  # regress: the value is the residual, the gradient flows through the prediction only.
  value, grad = jax.value_and_grad(lambda a: jnp.sum(base.regress(a * 2.0, a * 5.0)))(1.5)
  assert float(value) == pytest.approx(7.5) and float(grad) == pytest.approx(2.0)
  # Adaptive weighting reads the SUM of squares D * per_row: sg(1 / (D m + c)^p) m.
  per_row = jnp.asarray(ms, jnp.float32)
  options = base.CommonOptions(weighting='adaptive', adaptive_power=0.75, adaptive_eps=0.01)
  np.testing.assert_allclose(base.weigh(per_row, {}, None, None, options, 6),
                             ms / (6 * ms + 0.01) ** 0.75, rtol=1e-5)
  # The learned weighting: m exp(-u) + u, u = w . cos(2 pi ([s, t] F + phase)) / sqrt(F) + b.
  params = base.init_log_variance(jax.random.PRNGKey(1), num_features=4)
  params = {**params, 'w': jnp.array([0.5, -1.0, 2.0, 0.25]), 'b': jnp.array(0.3)}
  s, t = jnp.array([0.1, 0.2, 0.3, 0.4, 0.5]), jnp.array([0.6, 0.7, 0.8, 0.9, 1.0])
  st = np.stack([s, t], -1).astype(np.float64)
  feats = np.cos(2 * np.pi * (st @ np.asarray(params['frequencies'], np.float64) + np.asarray(params['phases'])))
  u = feats @ np.asarray(params['w']) / 2.0 + 0.3
  np.testing.assert_allclose(base.log_variance(params, s, t), u, rtol=1e-4, atol=1e-5)
  learned = base.CommonOptions(weighting='learned')
  np.testing.assert_allclose(base.weigh(per_row, {'log_variance': params}, s, t, learned, 6),
                             ms * np.exp(-u) + u, rtol=1e-4, atol=1e-5)


def test_the_loss_is_the_mean_over_all_rows_each_row_once():
  """3 off-diagonal and 5 diagonal rows: the loss is the mean of the 8, not of the two means."""
  off, diag = jnp.array([1.0, 2.0, 3.0]), jnp.array([10.0, 10.0, 10.0, 10.0, 20.0])
  loss, metrics = base.combine(off, off, diag, diag, {'extra': 1.0})
  assert float(loss) == pytest.approx(66.0 / 8)
  assert float(metrics['loss_offdiagonal']) == pytest.approx(2.0)
  assert float(metrics['loss_diagonal']) == pytest.approx(12.0)
  assert metrics['extra'] == 1.0
