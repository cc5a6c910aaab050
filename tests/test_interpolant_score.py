"""Interpolant.score and Interpolant.velocity_from_score against the closed-form score of a
Gaussian target's marginal, written here in float64 numpy (independent of fmjax.data.toy).

For x1 ~ N(m, diag(sigma^2)) and I_t = alpha_t x0 + beta_t x1 the marginal is
N(beta_t m, diag(alpha_t^2 + beta_t^2 sigma^2)): score(x) = -(x - mu_t) / std_t^2, and the
velocity is b_t(x) = mu'_t + (std'_t / std_t)(x - mu_t).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import interpolants

MEAN = np.array([1.0, -2.0])
STD = np.array([0.4, 1.7])           # std != 1: the score is not the noise's
SCHEDULES = {   # (alpha, beta, alpha', beta') in float64
    'linear': lambda t: (1 - t, t, -1.0, 1.0),
    'trigonometric': lambda t: (np.cos(np.pi * t / 2), np.sin(np.pi * t / 2),
                                -np.pi / 2 * np.sin(np.pi * t / 2), np.pi / 2 * np.cos(np.pi * t / 2)),
}


def _gaussian_marginal(name, t, x):
  """(velocity, score) of the Gaussian's marginal at time t, float64."""
  a, b, ad, bd = SCHEDULES[name](t)
  mu, var = b * MEAN, a**2 + b**2 * STD**2
  std, dstd = np.sqrt(var), (a * ad + b * bd * STD**2) / np.sqrt(var)
  return bd * MEAN + (dstd / std) * (x - mu), -(x - mu) / var


@pytest.mark.parametrize('name', ['linear', 'trigonometric'])
def test_score_and_its_inverse_match_the_gaussian_marginal(name):
  interp = interpolants.get(name)
  x = np.random.default_rng(0).normal(size=(5, 2)) * 2.0
  for t in (0.1, 0.35, 0.6, 0.9):
    velocity, score = _gaussian_marginal(name, t, x)
    t_batch = jnp.full((5,), t, jnp.float32)
    got = interp.score(t_batch, jnp.asarray(x, jnp.float32), jnp.asarray(velocity, jnp.float32))
    np.testing.assert_allclose(got, score, rtol=1e-4, atol=1e-4, err_msg=f'{name} t={t}')
    back = interp.velocity_from_score(t, jnp.asarray(x, jnp.float32), jnp.asarray(score, jnp.float32))
    np.testing.assert_allclose(back, velocity, rtol=1e-4, atol=1e-4, err_msg=f'{name} t={t}')
