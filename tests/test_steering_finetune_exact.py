"""Reward fine-tuning's building blocks (fmjax.steering.finetune) against independent answers at
temperature != 1 and regularization != 1: tilt_log_weights, k_step_sample against a plain loop,
reward_backprop_loss's value and gradients against numpy, and reward distillation's candidate
selection with labels (brute-force counts, labels following their rows, shuffled rows)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import interpolants, losses
from fmjax.steering import finetune

LINEAR = interpolants.get('linear')


def test_tilt_log_weights_are_log_softmax_of_r_over_lambda():
  r = np.array([0.3, -1.2, 2.0, 0.0, -0.7, 1.1, 0.4], np.float64)
  for lam in (0.37, 2.5):
    got = np.asarray(finetune.tilt_log_weights(jnp.asarray(r, jnp.float32), lam), np.float64)
    want = r / lam - np.log(np.sum(np.exp(r / lam)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # -inf (a forbidden candidate) gets weight zero; the others renormalize among themselves.
  got = finetune.tilt_log_weights(jnp.array([0.0, -jnp.inf, 1.0]), 0.37)
  assert np.isneginf(got[1]) and np.exp(np.asarray(got)).sum() == pytest.approx(1.0)


def test_k_step_sample_is_the_plain_loop():
  calls = []

  def bent(s, t, x, labels):
    calls.append((np.asarray(s), np.asarray(t)))
    return x + (t - s)[:, None] * jnp.sin(2 * x[:, ::-1] + s[:, None]) + 0.1 * labels[:, None]

  x0 = jax.random.normal(jax.random.PRNGKey(0), (5, 2))
  labels = jnp.arange(5, dtype=jnp.float32)
  got = finetune.k_step_sample(bent, x0, 3, labels)
  x = np.asarray(x0, np.float64)
  for i in range(3):
    s, t = i / 3, (i + 1) / 3
    x = x + (t - s) * np.sin(2 * x[:, ::-1] + s) + 0.1 * np.arange(5)[:, None]
  np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-5)
  got_times = np.array([(float(s[0]), float(t[0])) for s, t in calls])
  np.testing.assert_allclose(got_times, [(0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1)], rtol=1e-6)


def test_reward_backprop_loss_value_and_gradients():
  """loss = mean(-r(x) + (lambda rho / 2) |x - sg[x_base]|^2) with a non-quadratic reward
  r(x) = sum sin(x) - 0.3 |x|^2 at lambda = 0.37, rho = 2.5: value and d/dx against numpy, and
  no gradient at all into x_base (the stop-gradient)."""
  lam, rho = 0.37, 2.5
  reward = lambda x, labels=None: jnp.sum(jnp.sin(x), 1) - 0.3 * jnp.sum(x**2, 1)
  x = jax.random.normal(jax.random.PRNGKey(1), (7, 3))
  xb = jax.random.normal(jax.random.PRNGKey(2), (7, 3))
  (loss, metrics), (gx, gb) = jax.value_and_grad(
      lambda a, b: finetune.reward_backprop_loss(a, b, reward, None, lam, rho), (0, 1),
      has_aux=True)(x, xb)
  xn, bn = np.asarray(x, np.float64), np.asarray(xb, np.float64)
  r = np.sum(np.sin(xn), 1) - 0.3 * np.sum(xn**2, 1)
  d2 = np.sum((xn - bn) ** 2, 1)
  assert float(loss) == pytest.approx(np.mean(-r + 0.5 * lam * rho * d2), rel=1e-5)
  np.testing.assert_allclose(gx, (-(np.cos(xn) - 0.6 * xn) + lam * rho * (xn - bn)) / 7, rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_array_equal(np.asarray(gb), 0.0)
  assert float(metrics['reward']) == pytest.approx(r.mean(), rel=1e-5)
  assert float(metrics['distance_to_base']) == pytest.approx(d2.mean(), rel=1e-5)


# ----------------------------------------------------- reward distillation's candidate selection


@dataclasses.dataclass(frozen=True)
class _Unused:
  """A flow map the capture rule never calls."""

  def X(self, params, s, t, x, labels=None):
    return x

  def v(self, params, s, t, x, labels=None):
    return x

  def velocity(self, params, t, x, labels=None):
    return x


def _capture_rule(ctx):
  """An inner rule that hands back the rows it was given (as metrics) instead of a loss."""
  def loss_fn(params, rows, key):
    return jnp.float32(0.0), {'rows_x1': rows['x1'], 'rows_labels': rows['labels']}
  return loss_fn


def _encoding_base():
  """A base 'sampler' whose sample of candidate i is (i, its label): the rows that come out
  name the candidates they were drawn from."""
  def flow_map(s, t, z, labels):
    return jnp.stack([jnp.arange(z.shape[0], dtype=jnp.float32), labels.astype(jnp.float32)], 1)
  return finetune.BaseModel(flow_map=flow_map, velocity=None)


def _reward(x, labels=None):
  """Depends on the candidate index (through x_0) and on the label: uneven weights."""
  return -0.7 * jnp.mod(x[:, 0], 5.0) + 0.4 * labels


@pytest.fixture
def capture(monkeypatch):
  monkeypatch.setitem(finetune.INNER_RULES, 'capture', _capture_rule)
  n, candidates, lam = 21, 4, 0.37
  ft = finetune.FinetuneOptions(_reward, temperature=lam, steps=1, candidates=candidates,
                                inner='capture')
  rule = losses.make('reward_distill', _Unused(), LINEAR, teacher=_encoding_base(), finetune=ft)
  labels = jnp.asarray(np.random.default_rng(0).integers(0, 7, n), jnp.int32)
  run = jax.jit(lambda key: rule({'net': jnp.zeros(())}, {'x1': jnp.zeros((n, 2)), 'labels': labels},
                                 key)[1])
  return run, np.asarray(labels), n, candidates, lam


def test_reward_distill_resamples_candidates_with_their_labels(capture):
  """Each training row is a candidate i with the label of ITS candidate (labels[i mod n], the
  tiling of the batch's labels); the counts of each candidate are floor or ceil of n w_i with
  w = softmax(r / lambda) over the n x candidates rows (systematic resampling)."""
  run, labels, n, candidates, lam = capture
  m = n * candidates
  idx = np.arange(m)
  lab_c = labels[idx % n]
  r = -0.7 * np.mod(idx, 5) + 0.4 * lab_c
  w = np.exp(r / lam - np.max(r / lam))
  w /= w.sum()
  for seed in range(3):
    rows = run(jax.random.PRNGKey(seed))
    picked = np.asarray(rows['rows_x1'])[:, 0].astype(int)
    np.testing.assert_array_equal(np.asarray(rows['rows_labels']), lab_c[picked])
    np.testing.assert_array_equal(np.asarray(rows['rows_x1'])[:, 1], lab_c[picked])
    counts = np.bincount(picked, minlength=m)
    assert counts.sum() == n
    assert (counts >= np.floor(n * w) - 1e-6).all() and (counts <= np.ceil(n * w) + 1e-6).all()


def test_reward_distill_shuffles_rows_before_the_diagonal_split(capture):
  """The inner rule trains its last rows on the diagonal. Over 60 keys, the mean candidate index
  of the last quarter of the rows equals that of all rows (4.5 standard errors), where
  systematic resampling's sorted order would put the highest-index candidates there; and the
  rows do not come out sorted."""
  run, _, n, _, _ = capture
  gaps, sorted_runs = [], 0
  for seed in range(60):
    picked = np.asarray(run(jax.random.PRNGKey(100 + seed))['rows_x1'])[:, 0]
    gaps.append(picked[-n // 4:].mean() - picked.mean())
    sorted_runs += bool(np.all(np.diff(picked) >= 0))
  gaps = np.asarray(gaps)
  assert abs(gaps.mean()) < 4.5 * gaps.std() / np.sqrt(gaps.size) + 1e-9, gaps.mean()
  assert sorted_runs == 0
