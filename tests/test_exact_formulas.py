"""Formulas written out by hand: ODE steps and their cost, and the x-prediction map's EDM coefficients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import flow_maps, interpolants, samplers


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


def velocity(t, x):
  """A velocity that depends on time and state, so that a stage evaluated at the wrong time or
  at the wrong point changes the step."""
  return jnp.cos(3 * t)[:, None] * x + (t**2)[:, None]


def _states():
  x = jnp.array([[0.3, -1.2], [2.0, 0.5], [-0.7, 0.1]])
  s = jnp.array([0.1, 0.4, 0.2])
  t = jnp.array([0.5, 0.9, 0.35])
  return x, s, t


def test_explicit_runge_kutta_steps_match_their_tableaus_by_hand():
  x, s, t = _states()
  h, m = (t - s)[:, None], 0.5 * (s + t)
  k1 = velocity(s, x)
  by_hand = {'euler': x + h * k1,
             'midpoint': x + h * velocity(m, x + 0.5 * h * k1),
             'heun': x + 0.5 * h * (k1 + velocity(t, x + h * k1))}
  k2 = velocity(m, x + 0.5 * h * k1)
  k3 = velocity(m, x + 0.5 * h * k2)
  k4 = velocity(t, x + h * k3)
  by_hand['rk4'] = x + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6
  assert set(by_hand) == set(samplers.ODE_METHODS)
  for method, expected in by_hand.items():
    np.testing.assert_allclose(samplers.ode_step(velocity, x, s, t, method), expected, rtol=1e-13,
                               err_msg=method)
  # The midpoint stage at s instead of (s + t) / 2 is a different step here.
  wrong = x + h * velocity(s, x + 0.5 * h * k1)
  assert float(jnp.abs(wrong - by_hand['midpoint']).max()) > 1e-2


@pytest.mark.parametrize('method', sorted(samplers.ODE_METHODS))
def test_ode_nfe_counts_the_velocity_evaluations_of_a_step(method):
  x, s, t = _states()
  calls = []

  def counted(tt, xx):
    calls.append(1)
    return velocity(tt, xx)

  samplers.ode_step(counted, x, s, t, method)   # eager: every stage is one Python call
  assert len(calls) == {'euler': 1, 'midpoint': 2, 'heun': 2, 'rk4': 4}[method]
  assert samplers.ode_nfe(7, method) == 7 * len(calls)


@pytest.mark.parametrize('interp_name', ['linear', 'trigonometric'])
def test_x_prediction_map_uses_edm_preconditioning(interp_name):
  # EDM (Karras et al. 2022, Eq. 7 and Table 1) for x = x1 + sigma n: c_skip = sd^2 / (sigma^2 + sd^2),
  # c_out = sigma sd / sqrt(sigma^2 + sd^2), c_in = 1 / sqrt(sigma^2 + sd^2). I_s = alpha x0 + beta x1
  # is beta (x1 + sigma x0) with sigma = alpha / beta, so D(x) = EDM's D applied to x / beta.
  interp = interpolants.get(interp_name)
  sd = 0.5
  net = lambda p, s, t, x, labels: p * jnp.sin(x) + (s + 2 * t)[:, None]
  fm = flow_maps.make('x_prediction', net, interp, sigma_data=sd)
  x, s, t = _states()
  p = 1.3
  alpha_s, beta_s = interp.alpha(s)[:, None], interp.beta(s)[:, None]
  sigma = alpha_s / beta_s
  c_skip = sd**2 / (sigma**2 + sd**2)
  c_out = sigma * sd / jnp.sqrt(sigma**2 + sd**2)
  c_in = 1 / jnp.sqrt(sigma**2 + sd**2)
  y = x / beta_s
  D = c_skip * y + c_out * net(p, s, t, c_in * y, None)
  # The map puts D in place of x1 (and the matching x0) in the interpolant, from s to t.
  x0_hat = (x - beta_s * D) / alpha_s
  expected = interp.alpha(t)[:, None] * x0_hat + interp.beta(t)[:, None] * D
  np.testing.assert_allclose(fm.X(p, s, t, x, None), expected, rtol=1e-12)
  np.testing.assert_allclose(fm.v(p, s, t, x, None), (expected - x) / (t - s)[:, None], rtol=1e-10)
