import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import interpolants


@pytest.mark.parametrize('name', ['linear', 'trigonometric'])
def test_boundary_conditions_and_derivatives(name):
  interp = interpolants.get(name)
  a0, b0, _, _ = interp.coefficients(0.0)
  a1, b1, _, _ = interp.coefficients(1.0)
  np.testing.assert_allclose([a0, b0, a1, b1], [1, 0, 0, 1], atol=1e-6)
  t = jnp.linspace(0.05, 0.95, 7)
  h = 1e-3
  for f, df in ((interp.alpha, interp.alpha_dot), (interp.beta, interp.beta_dot)):
    central = (f(t + h) - f(t - h)) / (2 * h)
    np.testing.assert_allclose(df(t), central, rtol=1e-3, atol=1e-3)


def test_samples_the_endpoints_and_its_velocity():
  interp = interpolants.trigonometric()
  k0, k1 = jax.random.split(jax.random.PRNGKey(0))
  x0, x1 = jax.random.normal(k0, (5, 3)), jax.random.normal(k1, (5, 3)) + 2
  np.testing.assert_allclose(interp.sample(jnp.zeros(5), x0, x1), x0, atol=1e-6)
  np.testing.assert_allclose(interp.sample(jnp.ones(5), x0, x1), x1, atol=1e-6)
  t = jnp.linspace(0.1, 0.9, 5)
  h = 1e-3
  fd = (interp.sample(t + h, x0, x1) - interp.sample(t - h, x0, x1)) / (2 * h)
  np.testing.assert_allclose(interp.time_derivative(t, x0, x1), fd, rtol=1e-3, atol=2e-3)
  # The conditional velocity of the pair is its own posterior: denoise recovers x1.
  x_t = interp.sample(t, x0, x1)
  np.testing.assert_allclose(interp.denoise(t, x_t, interp.time_derivative(t, x0, x1)), x1,
                             atol=1e-4)


def test_custom_schedules_get_autodiff_derivatives():
  custom = interpolants.custom(lambda t: 1 - t**2, lambda t: t**2, name='quadratic')
  t = jnp.array([0.2, 0.5, 0.8])
  np.testing.assert_allclose(custom.alpha_dot(t), -2 * t, rtol=1e-6)
  np.testing.assert_allclose(custom.beta_dot(t), 2 * t, rtol=1e-6)


def test_bad_schedules_and_names_fail_clearly():
  with pytest.raises(ValueError, match='noise at t = 0'):
    interpolants.custom(lambda t: t, lambda t: 1 - t)
  with pytest.raises(ValueError, match='linear'):
    interpolants.get('cosine')
