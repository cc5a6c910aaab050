"""fmjax.steering.smc against closed forms: systematic resampling, unbiased normalizers and tilted
moments on a Gaussian, and the exact tilted Gaussian mixture with exact maps plugged in."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import interpolants
from fmjax.data.toy import GaussianMixtureTarget, GaussianTarget
from fmjax.evaluation.toy_metrics import energy_distance
from fmjax.steering import rewards, smc, tilted

LINEAR = interpolants.linear()


def test_systematic_resampling_is_unbiased_with_floor_or_ceil_counts():
  w = np.array([0.02, 0.3, 0.05, 0.13, 0.25, 0.0, 0.15, 0.1])
  n = w.size
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  idx = jax.vmap(lambda k: smc.systematic_resample(k, jnp.log(jnp.asarray(w))))(keys)
  counts = np.asarray(jax.vmap(lambda i: jnp.bincount(i, length=n))(idx))
  np.testing.assert_allclose(counts.mean(0), n * w, atol=0.03)     # E[count_i] = n w_i
  assert (counts >= np.floor(n * w) - 1e-6).all() and (counts <= np.ceil(n * w) + 1e-6).all()


def test_ess_fraction():
  assert float(smc.ess_fraction(jnp.zeros(10))) == pytest.approx(1.0)
  assert float(smc.ess_fraction(jnp.array([0.0, -1e9, -1e9, -1e9]))) == pytest.approx(0.25)
  w = np.array([0.5, 0.25, 0.25])
  assert float(smc.ess_fraction(jnp.log(jnp.asarray(w)))) == pytest.approx(1 / (3 * np.sum(w**2)), rel=1e-5)


def _gaussian_case():
  target = GaussianTarget(jnp.array([0.5, -1.0]), jnp.array([0.7, 1.3]))
  center, reward_std, lam = np.array([1.5, 0.5]), 1.0, 1.0
  tau = reward_std**2 * lam
  var, mean = np.asarray(target.std, np.float64)**2, np.asarray(target.mean, np.float64)
  # E_p[exp(r / lambda)] for r = -|x - c|^2 / (2 sigma^2): a Gaussian integral per dimension.
  normalizer = np.prod(np.sqrt(tau / (var + tau)) * np.exp(-(mean - center)**2 / (2 * (var + tau))))
  return target, center, reward_std, lam, normalizer, tilted.tilt_gaussian(target, center, reward_std, lam)


def _run(target, reward, lam, num, num_particles, seed=0, **kw):
  fm = lambda s, t, x, labels=None: target.flow_map(LINEAR, s, t, x)
  vel = lambda t, x, labels=None: target.velocity(LINEAR, t, x)
  run = jax.jit(lambda key, x0: smc.smc(key, x0, flow_map=fm, velocity=vel, interpolant=LINEAR,
                                        reward=reward, temperature=lam,
                                        num_particles=num_particles, **kw))
  x0 = jax.random.normal(jax.random.PRNGKey(seed), (num, target.dim))
  return run(jax.random.PRNGKey(seed + 1), x0)


def _group_estimates(out, groups, particles, normalizer):
  """Per group g: Z_g / Z and the unnormalized moments (Z_g / Z) sum_i W_gi x_gi and
  (Z_g / Z) sum_i W_gi x_gi^2, whose expectations are exactly 1, E_q[x] and E_q[x^2] when the
  weights are right (SMC's unnormalized estimates are unbiased); the spread over groups gives
  the Monte Carlo standard errors."""
  z = np.exp(np.asarray(out.log_normalizer, np.float64)) / normalizer
  w = np.exp(np.asarray(out.log_weights, np.float64)).reshape(groups, particles) * z[:, None]
  x = np.asarray(out.samples, np.float64).reshape(groups, particles, -1)
  return z, np.einsum('gp,gpd->gd', w, x), np.einsum('gp,gpd->gd', w, x**2)


def _assert_within(estimates, truth, slack):
  """The mean over groups agrees with the truth to 4 standard errors plus a small slack, and
  the standard error itself is small (wrong weights are often wildly spread, not just off)."""
  estimates = np.asarray(estimates)
  se = estimates.std(0) / np.sqrt(estimates.shape[0])
  assert (se < 0.05).all(), se
  assert (np.abs(estimates.mean(0) - truth) < 4 * se + slack).all(), (estimates.mean(0), truth, se)


def test_gaussian_normalizer_unbiased_and_weighted_moments_tilted():
  """Guided, resampled SMC on N(m, diag s^2) with exact maps: the normalizer estimates average
  to E_p[exp(r/lambda)] (SMC's normalizer estimate is unbiased), and the weighted particle
  moments are the tilted Gaussian's (closed form)."""
  target, center, reward_std, lam, normalizer, q = _gaussian_case()
  groups, particles = 128, 128
  out = _run(target, rewards.quadratic(center, reward_std), lam, groups * particles, particles,
             num_steps=4, noise=0.5, final_resample=False)
  z, first, second = _group_estimates(out, groups, particles, normalizer)
  _assert_within(z, 1.0, 0.01)
  _assert_within(first, q.mean, 0.01)
  _assert_within(second, q.mean**2 + q.std**2, 0.015)
  ess = np.asarray(out.ess)
  assert ess.shape == (5,) and (ess > 0).all() and (ess <= 1 + 1e-6).all()
  assert float(np.asarray(out.resampled).max()) > 0                 # resampling did happen
  assert out.nfe == smc.smc_nfe(4) == 3 * 4 + 1                     # (vjp 2 + jump + velocity) x 3 + last look


def test_guided_weights_correct_the_drift():
  """A strong guidance drift without resampling: only the kernel-ratio correction keeps the
  normalizer and the weighted mean right (dropping it biases toward the reward's center)."""
  target, center, reward_std, lam, normalizer, q = _gaussian_case()
  groups, particles = 128, 128
  out = _run(target, rewards.quadratic(center, reward_std), lam, groups * particles, particles,
             seed=3, num_steps=4, noise=0.5, guidance_scale=1.5, ess_threshold=0.0,
             final_resample=False)
  z, first, second = _group_estimates(out, groups, particles, normalizer)
  _assert_within(z, 1.0, 0.01)
  _assert_within(first, q.mean, 0.01)
  _assert_within(second, q.mean**2 + q.std**2, 0.015)


def test_exact_mixture_maps_recover_the_tilted_mixture():
  """Exact velocity and flow map of a 3-mode mixture (RK4, 8 steps), flow-map look-ahead and
  transport: the resampled samples match the closed-form tilted mixture, whose mode weights
  differ strongly from p's (mass must move between modes): energy distance within 2x of the
  noise floor of two exact draws of the same size, mode masses within 0.04."""
  p = GaussianMixtureTarget(np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]]), np.array([0.5, 0.5, 0.4]),
                            np.array([0.5, 0.3, 0.2]), ode_steps=8)
  center, reward_std, lam = np.array([1.5, 1.0]), 1.0, 1.0
  q = tilted.tilt_gaussian_mixture(p, center, reward_std, lam)
  assert abs(q.weights[1] - p.weights[1]) > 0.5
  num = 1024
  out = _run(p, rewards.quadratic(center, reward_std), lam, num, 256, seed=7, num_steps=4, noise=0.5)
  ref = q.sample(jax.random.PRNGKey(11), num)
  floors = [float(energy_distance(q.sample(jax.random.PRNGKey(20 + i), num), ref)) for i in range(4)]
  floor = max(np.mean(np.abs(floors)), 1e-4)
  distance = float(energy_distance(out.samples, ref))
  assert distance < 2 * floor + 1e-3, (distance, floors)
  np.testing.assert_allclose(tilted.mode_masses(q, out.samples), q.weights, atol=0.04)
  assert out.nfe == 13 and np.asarray(out.ess).shape == (5,)


def test_bad_inputs_raise_clear_errors():
  x0 = jnp.zeros((10, 2))
  kw = dict(flow_map=lambda s, t, x, l=None: x, velocity=lambda t, x, l=None: x, interpolant=LINEAR,
            reward=rewards.quadratic(0.0, 1.0), temperature=1.0, num_steps=2)
  with pytest.raises(ValueError, match='multiple of'):
    smc.smc_sample(jax.random.PRNGKey(0), x0, num_particles=3, **kw)
  with pytest.raises(ValueError, match='look-ahead'):
    smc.smc_sample(jax.random.PRNGKey(0), x0, num_particles=5, lookahead='oracle', **kw)
  with pytest.raises(ValueError, match='schedule'):
    smc.smc_sample(jax.random.PRNGKey(0), x0, num_particles=5, schedule='cubic', **kw)
  with pytest.raises(ValueError, match='temperature'):
    smc.smc_sample(jax.random.PRNGKey(0), x0, num_particles=5, **{**kw, 'temperature': 0.0})
