"""The steering base against closed forms: tilted mixtures, the score from a velocity, look-ahead
gradients (kept and dropped Jacobian), rewards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import interpolants
from fmjax.data.toy import GaussianMixtureTarget, GaussianTarget
from fmjax.steering import lookahead, rewards, tilted

jax.config.update('jax_enable_x64', False)

MIXTURE = GaussianMixtureTarget(np.array([[0., 0.], [3., 1.], [-2., 2.]]), np.array([1., .5, .8]),
                                np.array([.5, .3, .2]))


def _log_mixture(target, x, alpha=0.0, beta=1.0):
  """log of sum_k w_k N(x; beta mu_k, (alpha^2 + beta^2 s_k^2) I), in float64 numpy."""
  x = np.asarray(x, np.float64)
  var = alpha**2 + beta**2 * np.asarray(target.stds, np.float64) ** 2
  d = x.shape[-1]
  log_k = (np.log(np.asarray(target.weights, np.float64))[None]
           - 0.5 * np.sum((x[:, None] - beta * np.asarray(target.means, np.float64)[None]) ** 2, -1) / var
           - 0.5 * d * np.log(2 * np.pi * var))
  m = log_k.max(1, keepdims=True)
  return (m + np.log(np.exp(log_k - m).sum(1, keepdims=True)))[:, 0]


@pytest.mark.parametrize('temperature,std', [(1.0, 1.0), (0.25, 2.0), (3.0, 0.5)])
def test_tilted_mixture_is_the_tilted_density(temperature, std):
  """log q(x) - log p(x) - r(x)/lambda is one constant at every x (q normalized by construction)."""
  center = np.array([2.0, -1.0])
  q = tilted.tilt_gaussian_mixture(MIXTURE, center, std, temperature)
  x = np.random.default_rng(0).normal(size=(50, 2)) * 3
  r = -0.5 * np.sum((x - center) ** 2, -1) / std**2
  gap = _log_mixture(q, x) - _log_mixture(MIXTURE, x) - r / temperature
  np.testing.assert_allclose(gap - gap.mean(), 0.0, atol=2e-5)
  # and the weights match a direct importance-weighted estimate of the component masses
  assert q.weights.sum() == pytest.approx(1.0, abs=1e-6)


def test_tilted_gaussian_matches_one_component_mixture():
  g = GaussianTarget(np.array([1.0, -2.0]), np.array([0.5, 2.0]))
  q = tilted.tilt_gaussian(g, [0.0, 0.0], 1.5, 0.5)
  tau = 1.5**2 * 0.5
  var = 1 / (1 / np.array([0.25, 4.0]) + 1 / tau)
  np.testing.assert_allclose(q.std**2, var, rtol=1e-6)
  np.testing.assert_allclose(q.mean, var * np.array([1.0, -2.0]) / np.array([0.25, 4.0]), rtol=1e-6)


def test_mode_masses_of_exact_draws():
  x = MIXTURE.sample(jax.random.PRNGKey(0), 20000)
  np.testing.assert_allclose(tilted.mode_masses(MIXTURE, x), MIXTURE.weights, atol=0.02)


@pytest.mark.parametrize('name', ['linear', 'trigonometric'])
@pytest.mark.parametrize('t', [0.2, 0.5, 0.85])
def test_score_from_velocity_equals_grad_log_marginal(name, t):
  interp = interpolants.get(name)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(6, 2)) * 2, jnp.float32)
  b = MIXTURE.velocity(interp, t, x)
  score = lookahead.score_from_velocity(interp, t, x, b)
  a, be = float(interp.alpha(jnp.float32(t))), float(interp.beta(jnp.float32(t)))
  eps = 1e-5
  fd = np.stack([(_log_mixture(MIXTURE, np.asarray(x) + eps * e, a, be)
                  - _log_mixture(MIXTURE, np.asarray(x) - eps * e, a, be)) / (2 * eps)
                 for e in np.eye(2)], -1)
  np.testing.assert_allclose(score, fd, rtol=2e-3, atol=2e-3)


def _bent_map(s, t, x, labels=None):
  """A nonlinear stand-in for X_{t,1}: its Jacobian is not the identity."""
  return x + (t - s) * jnp.sin(2 * x[:, ::-1])


def test_lookahead_gradient_kept_and_dropped():
  reward = rewards.quadratic(jnp.array([1.0, -0.5]), 0.7)
  look = lookahead.make_lookahead('flow_map', flow_map=_bent_map)
  x = jnp.array([[0.3, -0.4], [1.2, 0.9]], jnp.float32)
  t = 0.3
  values, exact = lookahead.value_and_grad(look, reward, t, x)
  _, dropped = lookahead.value_and_grad(look, reward, t, x, keep_jacobian=False)
  np.testing.assert_allclose(values, reward(_bent_map(t, 1.0, x), None), rtol=1e-6)
  eps = 1e-3
  fd = np.stack([(reward(look(t, x + eps * e), None) - reward(look(t, x - eps * e), None)) / (2 * eps)
                 for e in np.eye(2, dtype=np.float32)], -1)
  np.testing.assert_allclose(exact, fd, rtol=2e-3, atol=2e-3)
  y = _bent_map(t, 1.0, x)                      # dropped: grad r at the look-ahead point
  np.testing.assert_allclose(dropped, -(y - jnp.array([1.0, -0.5])) / 0.49, rtol=1e-5)
  assert np.abs(np.asarray(exact - dropped)).max() > 0.1


def test_denoiser_lookahead_is_the_posterior_mean_of_a_gaussian():
  interp = interpolants.linear()
  g = GaussianTarget(np.array([1.0, -1.0]), np.array([0.5, 2.0]))
  t, x = 0.4, jnp.array([[0.2, 0.7]], jnp.float32)
  look = lookahead.make_lookahead('denoiser', velocity=lambda tt, xx, l: g.velocity(interp, tt, xx),
                                  interpolant=interp)
  var1 = np.array([0.25, 4.0])           # E[x1 | t x1 + (1 - t) x0 = x], Gaussian conditioning
  expected = g.mean + t * var1 / (t**2 * var1 + (1 - t) ** 2) * (np.asarray(x) - t * np.asarray(g.mean))
  np.testing.assert_allclose(look(t, x), expected, rtol=1e-5)
  assert lookahead.lookahead_nfe('naive') == 0 and lookahead.lookahead_nfe('denoiser') == 1


def test_rewards_values_and_checks():
  x = jnp.array([[1.0, 2.0], [-1.0, 0.0]])
  np.testing.assert_allclose(rewards.quadratic([1.0, 0.0], 2.0)(x, None), [-0.5, -0.5])
  np.testing.assert_allclose(rewards.one_sided_quadratic()(x, None), [0.0, -1.0])
  np.testing.assert_allclose(rewards.gaussian_log_density([1.0, 0.0], 2.0)(x, None),
                             -0.5 - np.log(2 * np.pi * 4.0), rtol=1e-6)
  rewards.check_reward(rewards.quadratic(0.0, 1.0), x)
  with pytest.raises(ValueError, match='one value per row'):
    rewards.check_reward(lambda y, l: y, x)
  with pytest.raises(ValueError, match='std > 0'):
    rewards.quadratic(0.0, 0.0)


def test_steer_result_weights_are_the_normalized_exponentials():
  from fmjax.steering.result import SteerResult
  out = SteerResult(jnp.zeros((3, 2)), jnp.log(jnp.array([1.0, 2.0, 5.0])), None, 4)
  np.testing.assert_allclose(out.weights, [0.125, 0.25, 0.625], rtol=1e-6)
  assert SteerResult(jnp.zeros((3, 2))).weights is None
