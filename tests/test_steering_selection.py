"""Best-of-N, the guidance drift and the closed-form tilted targets (fmjax.steering.reward_guidance,
fmjax.steering.tilted) against independent answers at temperatures != 1: selection frequencies
against softmax(r / lambda) by brute-force counts, labels of class-conditional candidates,
hard constraints and NaN rewards, one guided flow-map step by hand, and the tilted mixture
against numerical integration on a grid."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import interpolants
from fmjax.data.toy import GaussianMixtureTarget, GaussianTarget
from fmjax.steering import reward_guidance, rewards, selection, tilted

LINEAR = interpolants.linear()
# Five fixed candidates (1-D rows) with distinct rewards r = -(x - 1)^2 / 2.
CANDIDATES = np.array([-1.0, 0.0, 0.5, 1.0, 2.5], np.float32)


def _fixed_candidates(key, count, labels):
  """Every output row sees the same five candidates (the key is ignored)."""
  return jnp.tile(jnp.asarray(CANDIDATES)[:, None], (count // CANDIDATES.size, 1))


def _reward(x, labels=None):
  return -0.5 * (x[:, 0] - 1.0) ** 2


@pytest.mark.parametrize('lam', [0.37, 2.5])
def test_importance_selection_frequencies_are_softmax_r_over_lambda(lam):
  """20000 outputs, each picking one of the same five candidates: the pick counts match
  softmax(r / lambda) to 4.5 binomial standard errors; argmax always takes the best; ess is
  (sum w)^2 / (n sum w^2) of those weights."""
  num, n = 20000, CANDIDATES.size
  out = jax.jit(lambda k: selection.best_of_n(k, _fixed_candidates, _reward, num, n,
                                             temperature=lam, select='importance'))(
      jax.random.PRNGKey(0))
  r = -0.5 * (CANDIDATES.astype(np.float64) - 1.0) ** 2
  w = np.exp(r / lam - np.max(r / lam))
  w /= w.sum()
  picked = np.asarray(out.samples)[:, 0]
  freq = np.array([(picked == c).mean() for c in CANDIDATES])
  assert freq.sum() == pytest.approx(1.0)
  assert np.all(np.abs(freq - w) < 4.5 * np.sqrt(w * (1 - w) / num)), (freq, w)
  np.testing.assert_allclose(out.ess, [1 / (n * np.sum(w**2))], rtol=1e-5)
  best = jax.jit(lambda k: selection.best_of_n(k, _fixed_candidates, _reward, 7, n,
                                              temperature=lam, select='argmax'))(jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(best.samples)[:, 0], 1.0)
  np.testing.assert_array_equal(np.asarray(out.reward_check), [0, num * n, 0, num])


MIXTURE = GaussianMixtureTarget(np.array([[-2.0, 0.0], [2.0, 0.5]]), np.array([0.5, 0.7]),
                                np.array([0.6, 0.4]))


@pytest.mark.parametrize('lam', [0.37, 2.5])
def test_importance_best_of_n_tends_to_the_tilted_mixture(lam):
  """Exact draws of a two-mode mixture, n = 64 candidates per output, r = -|x - (1, 1)|^2 /
  (2 * 1.5^2): the outputs' mode masses and mean match the closed-form tilted mixture at
  lambda (the self-normalization bias is O(1 / n); measured errors <= 0.02 at 4000 outputs)."""
  center = np.array([1.0, 1.0])
  q = tilted.tilt_gaussian_mixture(MIXTURE, center, 1.5, lam)
  out = jax.jit(lambda k: selection.best_of_n(
      k, lambda key, count, y: MIXTURE.sample(key, count), rewards.quadratic(center, 1.5), 4000, 64,
      temperature=lam, select='importance'))(jax.random.PRNGKey(1))
  np.testing.assert_allclose(tilted.mode_masses(q, out.samples), q.weights, atol=0.03)
  q_mean = np.sum(np.asarray(q.weights)[:, None] * np.asarray(q.means), 0)
  np.testing.assert_allclose(np.asarray(out.samples).mean(0), q_mean, atol=0.05)
  # The wrong use of lambda (multiply instead of divide) would give another law, far from q.
  wrong = tilted.tilt_gaussian_mixture(MIXTURE, center, 1.5, 1 / lam)
  assert np.max(np.abs(np.asarray(wrong.weights) - np.asarray(q.weights))) > 0.1


def test_best_of_n_candidates_keep_their_rows_labels():
  """A class-conditional base (x = 10 y + noise) and 9 outputs with labels 0..8 in a shuffled
  order, n = 4: each output's candidates are drawn with ITS label (jnp.repeat, not tile)."""
  labels = jnp.array([3, 0, 8, 5, 1, 7, 2, 6, 4])
  sample_fn = lambda key, count, y: (10.0 * y[:, None] + jax.random.normal(key, (count, 1)))
  for select in ('importance', 'argmax'):
    out = jax.jit(lambda k, y: selection.best_of_n(k, sample_fn, _reward, 9, 4, temperature=0.37,
                                                  select=select, labels=y))(jax.random.PRNGKey(2), labels)
    np.testing.assert_array_equal(np.round(np.asarray(out.samples)[:, 0] / 10), labels)


def test_best_of_n_hard_constraint_and_nan():
  """reward -inf for x < 0: no output is ever negative, under both selections; an output whose
  candidates are all -inf, or a NaN reward, is one clear error (eager) or a count (jit)."""
  sample_fn = lambda key, count, y: jax.random.normal(key, (count, 1)) - 0.5
  constrained = lambda x, labels=None: jnp.where(x[:, 0] >= 0, -x[:, 0], -jnp.inf)
  for select in ('importance', 'argmax'):
    out = jax.jit(lambda k: selection.best_of_n(k, sample_fn, constrained, 501, 16, temperature=2.5,
                                               select=select))(jax.random.PRNGKey(3))
    assert np.all(np.asarray(out.samples) >= 0)
  # Outside jit (eager): the errors at once.
  with pytest.raises(ValueError, match=r'best_of_n: \d+ of 101 groups have no sample with a finite'):
    selection.best_of_n(jax.random.PRNGKey(3), sample_fn, constrained, 101, 1, temperature=2.5)
  nan_reward = lambda x, labels=None: jnp.where(x[:, 0] > 1.5, jnp.nan, x[:, 0])
  with pytest.raises(ValueError, match=r'best_of_n: the reward \(or its gradient\) was NaN or \+inf '
                                       r'for \d+ of 1616 rows'):
    selection.best_of_n(jax.random.PRNGKey(3), sample_fn, nan_reward, 101, 16, temperature=2.5)
  out = jax.jit(lambda k: selection.best_of_n(k, sample_fn, nan_reward, 501, 16,
                                             temperature=2.5))(jax.random.PRNGKey(3))
  x = np.asarray(sample_fn(jax.random.split(jax.random.PRNGKey(3))[0], 501 * 16, None))
  assert int(out.reward_check[0]) == int(np.sum(x[:, 0] > 1.5)) > 0
  with pytest.raises(ValueError, match='NaN'):
    out.check('best_of_n')


def test_one_guided_flow_map_step_by_hand():
  """times (0, 1/2, 1), flow-map look-ahead with its Jacobian, lambda = 0.37, guidance_scale
  1.3, Gaussian N(m, diag s^2) with exact maps: y = X_{0,1/2}(x0), then
  y += (1/2) * 1.3 * k_{1/2} * (s / sigma_{1/2}) grad r(X_{1/2,1}(y)) / lambda with
  k_{1/2} = (1 - t) / t = 1, then the jump to t = 1 (no guidance there: k_1 = 0)."""
  mean, std = np.array([1.0, -0.5]), np.array([0.7, 1.3])
  target = GaussianTarget(jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32))
  center, reward_std, lam, scale = np.array([2.0, 1.0]), 0.8, 0.37, 1.3
  x0 = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (7, 2)), np.float64)
  out = jax.jit(lambda x: reward_guidance.guided_sample(
      x, flow_map=lambda s, t, x, y=None: target.flow_map(LINEAR, s, t, x),
      velocity=lambda t, x, y=None: target.velocity(LINEAR, t, x), interpolant=LINEAR,
      reward=rewards.quadratic(center, reward_std), temperature=lam, times=(0.0, 0.5, 1.0),
      guidance_scale=scale))(jnp.asarray(x0, jnp.float32))
  s05 = np.sqrt(0.25 + 0.25 * std**2)
  y = 0.5 * mean + s05 * x0
  look = mean + (std / s05) * (y - 0.5 * mean)
  y = y + 0.5 * scale * 1.0 * (std / s05) * (-(look - center) / reward_std**2) / lam
  want = mean + (std / s05) * (y - 0.5 * mean)
  np.testing.assert_allclose(out.samples, want, rtol=1e-4, atol=1e-4)
  assert out.nfe == 2 + 2
  np.testing.assert_array_equal(np.asarray(out.reward_check), [0, 7, 0, 0])


def test_guidance_nan_reward_is_an_error():
  target = GaussianTarget(jnp.zeros(2), jnp.ones(2))
  kw = dict(flow_map=lambda s, t, x, y=None: target.flow_map(LINEAR, s, t, x),
            velocity=lambda t, x, y=None: target.velocity(LINEAR, t, x), interpolant=LINEAR,
            temperature=0.37, times=(0.0, 0.5, 1.0))
  nan_reward = lambda x, labels=None: jnp.where(jnp.arange(x.shape[0]) == 1, jnp.nan, x[:, 0])
  with pytest.raises(ValueError, match=r'guidance: the reward \(or its gradient\) was NaN or \+inf '
                                       r'for 1 of 5 rows'):
    reward_guidance.guided_sample(jnp.ones((5, 2)), reward=nan_reward, **kw)


# ------------------------------------------------------------------ tilted.py by quadrature


def _grid(lo=-9.0, hi=9.0, n=721):
  g = np.linspace(lo, hi, n)
  xx, yy = np.meshgrid(g, g, indexing='ij')
  return np.stack([xx.ravel(), yy.ravel()], -1), (g[1] - g[0]) ** 2


def _mixture_density(target, x):
  means, stds = np.asarray(target.means, np.float64), np.asarray(target.stds, np.float64)
  w = np.asarray(target.weights, np.float64)
  d2 = np.sum((x[:, None] - means[None]) ** 2, -1)
  return np.sum(w * np.exp(-0.5 * d2 / stds**2) / (2 * np.pi * stds**2), 1)


@pytest.mark.parametrize('lam', [0.37, 2.5])
def test_tilted_mixture_against_quadrature(lam):
  """p exp(r / lambda) normalized on a fine 2-D grid: its mass on each half-plane x_0 > 0 (where
  the mixture's right mode lives), mean and covariance equal the closed-form tilted mixture's."""
  p = GaussianMixtureTarget(np.array([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]), np.array([0.6, 0.5, 0.8]),
                            np.array([0.5, 0.3, 0.2]))
  center, reward_std = np.array([1.0, -1.0]), 1.3
  q = tilted.tilt_gaussian_mixture(p, center, reward_std, lam)
  x, cell = _grid()
  dens = _mixture_density(p, x) * np.exp(-0.5 * np.sum((x - center) ** 2, 1) / reward_std**2 / lam)
  dens /= dens.sum() * cell
  exact = _mixture_density(q, x)
  np.testing.assert_allclose(exact, dens, atol=2e-3 * dens.max())
  mean = np.sum(dens[:, None] * x, 0) * cell
  cov = np.einsum('n,ni,nj->ij', dens, x - mean, x - mean) * cell
  w, mu, s = (np.asarray(a, np.float64) for a in (q.weights, q.means, q.stds))
  q_mean = w @ mu
  q_cov = np.einsum('k,ki,kj->ij', w, mu - q_mean, mu - q_mean) + np.sum(w * s**2) * np.eye(2)
  np.testing.assert_allclose(mean, q_mean, atol=1e-4)
  np.testing.assert_allclose(cov, q_cov, atol=1e-4)


@pytest.mark.parametrize('lam', [0.37, 2.5])
def test_tilted_gaussian_against_importance_weights(lam):
  """N(m, diag s^2) tilted: self-normalized importance weights exp(r / lambda) on 400000 exact
  draws (numpy) give the closed form's mean and std to 5 standard errors."""
  mean, std = np.array([1.0, -2.0]), np.array([0.5, 2.0])
  center, reward_std = np.array([0.0, 1.0]), 1.5
  q = tilted.tilt_gaussian(GaussianTarget(mean, std), center, reward_std, lam)
  x = np.random.default_rng(0).normal(size=(400000, 2)) * std + mean
  log_w = -0.5 * np.sum((x - center) ** 2, 1) / reward_std**2 / lam
  w = np.exp(log_w - log_w.max())
  w /= w.sum()
  est_mean = w @ x
  est_std = np.sqrt(w @ (x - est_mean) ** 2)
  ess = 1 / np.sum(w**2)
  bound = 5 * np.asarray(q.std, np.float64) / np.sqrt(ess)
  assert np.all(np.abs(est_mean - q.mean) < bound), (est_mean, q.mean, bound)
  assert np.all(np.abs(est_std - q.std) < bound), (est_std, q.std, bound)
