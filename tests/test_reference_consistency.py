"""ECT, sCT and progressive distillation written again in their papers' own notation, with
finite differences (float64) where derivatives appear, against fmjax's rules: value and
gradient on the same parameters, inputs, keys and time draws.

The shared float64 machinery (network, inputs, diagonal rows, comparison) is that of
tests/test_rule_gradients.py; only the off-diagonal formula is replaced here.
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import test_rule_gradients as G
from fmjax.losses import consistency

sg = jax.lax.stop_gradient
HALF = {'diagonal_fraction': 0.5}


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


def ect_in_edm_sigma(p, x0, x1, y, key, step, o, use_teacher):
  """ECT (Geng et al. 2406.14548; locuslab/ect training/loss.py, ECMLoss with the sigmoid
  mapping) in EDM noise level on the linear interpolant: t = exp(P_mean + P_std n) (:54-55,
  P_mean -1.1, P_std 2.0), x_t = y + t eps, f(x, t) the consistency function,
  r = max(0, t (1 - q^-(k+1) (1 + 8 sigmoid(-t)))) (:45-50), k = floor(step / d), loss
  sqrt(|f(x_t, t) - sg f(x_r, r)|^2 + c^2) - c over the SUMMED squares (:82-89, c = 0), divided
  by t - r (:92). fmjax's I_s = (1 - s) eps + s y = x_t / (1 + t) with s = 1 / (1 + t), so
  f(x, t) = X_{1 / (1 + t), 1}(x / (1 + t)); f(x, 0) = x (the data). fmjax's distance is
  per-dimension, i.e. the reference's divided by sqrt(D) when c = 0."""
  del use_teacher
  t = jnp.exp(o.get('sigma_mean', -1.1) + o.get('sigma_std', 2.0) * jax.random.normal(key, x0.shape[:1]))
  q, d = o.get('gap_decay', 2.0), o.get('gap_halving_steps', 25_000)
  k = step // d
  r = jnp.maximum(0.0, t * (1 - (1 + 8 / (1 + jnp.exp(t))) / q ** (k + 1)))
  eps, data = x0, x1
  one = jnp.ones_like(t)

  def f(x, sigma):
    return G.X(p, 1 / (1 + sigma), one, x / (1 + sigma)[:, None], y)

  err = f(data + t[:, None] * eps, t) - sg(f(data + r[:, None] * eps, r))
  c = o.get('huber_c', 0.0) * np.sqrt(G.D)   # the constant on the summed scale
  distance = jnp.sqrt(jnp.sum(err**2, axis=-1) + c**2) - c
  return distance / np.sqrt(G.D) / (t - r), 1 / (1 + t), one


def trigflow_to_fmjax_time(interp, tau, sigma_d):
  """fmjax's s with the noise level of TrigFlow's tau: alpha_s / beta_s = sigma_d tan(tau)."""
  if interp.name == 'linear':
    return 1 / (1 + sigma_d * jnp.tan(tau))
  return 2 / np.pi * jnp.arctan2(1.0, sigma_d * jnp.tan(tau))


def sct_in_trigflow_time(p, x0, x1, y, key, step, o, use_teacher):
  """sCT / sCD (Lu & Song 2410.11081, Alg. 1) in TrigFlow: tan(tau) = e^{n'} / sigma_d,
  n' ~ N(P_mean, P_std^2), z = sigma_d noise, x_tau = cos(tau) x_data + sin(tau) z,
  dx_tau/dtau = cos(tau) z - sin(tau) x_data (sCT) or the teacher's velocity carried into
  TrigFlow coordinates (sCD), r = min(1, step / H),
    g = -cos^2(tau)(sigma_d F - dx/dtau) - r cos(tau) sin(tau)(x_tau + sigma_d dF/dtau),
  g <- g / (|g| + c), loss |F - sg(F) - g|^2. F is read off fmjax's map through
  f = cos(tau) x_tau - sin(tau) sigma_d F with f(x_tau, tau) = X_{s,1}((beta_s / cos tau) x_tau),
  s the fmjax time of the same noise level; dF/dtau by a central finite difference (h = 1e-5)."""
  sd = o.get('trigflow_sigma_data', 0.5)
  interp = o['interp']
  tau = jnp.arctan(jnp.exp(o.get('sigma_mean', -1.0) + o.get('sigma_std', 1.4)
                           * jax.random.normal(key, x0.shape[:1])) / sd)
  s_of = lambda tt: trigflow_to_fmjax_time(interp, tt, sd)
  s = s_of(tau)
  one = jnp.ones_like(s)
  col = lambda a: a[:, None]
  data, z = x1, sd * x0
  x_tau = col(jnp.cos(tau)) * data + col(jnp.sin(tau)) * z
  to_fmjax = lambda tt: col(interp.beta(s_of(tt)) / jnp.cos(tt))     # I_s = (beta_s / cos tau) x_tau
  h = 1e-5
  if use_teacher:
    # x_tau(tau') = (cos tau' / beta_s') I_s' with I following the teacher from (s, I_s).
    xs = to_fmjax(tau) * x_tau
    b = o['teacher_fn'](s, xs, y)
    path = lambda tt: (xs + col(s_of(tt) - s) * b) / to_fmjax(tt)
    dx = (path(tau + h) - path(tau - h)) / (2 * h)
  else:
    dx = col(jnp.cos(tau)) * z - col(jnp.sin(tau)) * data
  f = lambda x, tt: G.X(p, s_of(tt), one, to_fmjax(tt) * x, y)
  F = lambda x, tt: (col(jnp.cos(tt)) * x - f(x, tt)) / (sd * col(jnp.sin(tt)))
  dF = (F(x_tau + h * dx, tau + h) - F(x_tau - h * dx, tau - h)) / (2 * h)
  warmup = o.get('warmup_steps', 10_000)
  r = min(1.0, step / warmup) if warmup else 1.0
  cos, sin = col(jnp.cos(tau)), col(jnp.sin(tau))
  F_now = F(x_tau, tau)
  g = -cos**2 * (sd * F_now - dx) - r * cos * sin * (x_tau + sd * dF)
  c = o.get('tangent_normalization', 0.1)
  if c > 0:
    g = g / (jnp.sqrt(G.msq(g))[:, None] + c)
  return G.msq(F_now - sg(F_now) - sg(g)), s, one


def progressive_as_salimans_ho(p, x0, x1, y, key, step, o, use_teacher):
  """Progressive distillation (Salimans & Ho 2022, Algorithm 2, as a map by Boffi et al.
  2406.07507): the student's one jump s -> t regresses onto the teacher's two half jumps,
  each `teacher_steps` (default 8) Heun steps of the teacher velocity."""
  del step, use_teacher
  s, t = G.times_lib.sample_pairs(jax.random.split(key)[0], x0.shape[0], G.UNIFORM)
  u = (s + t) / 2
  xs = o['interp'].sample(s, x0, x1)
  n = o.get('teacher_steps', 8)
  half = lambda a, c, x: G.ode_steps(o['teacher_fn'], a, c, x, y, n, 'heun')
  target = half(u, t, half(s, u, xs))
  return G.msq(G.X(p, s, t, xs, y) - sg(target)), s, t


CASES = [
    ('ect', 'linear', ect_in_edm_sigma, {**HALF, 'gap_halving_steps': 1000, 'step': 2500}, 1e-10),
    ('ect', 'linear', ect_in_edm_sigma, {**HALF, 'step': 0, 'huber_c': 0.03}, 1e-10),
    ('sct', 'trigonometric', sct_in_trigflow_time, {**HALF, 'weighting': 'learned', 'step': 4000}, 1e-6),
    ('sct', 'linear', sct_in_trigflow_time, {**HALF, 'tangent_normalization': 0.0, 'step': 20_000}, 1e-6),
    ('sct', 'trigonometric', sct_in_trigflow_time, {**HALF, 'teacher': True, 'step': 2500,
                                                    'trigflow_sigma_data': 1.0}, 1e-6),
    ('progressive', 'linear', progressive_as_salimans_ho, {**HALF}, 1e-6),
    ('progressive', 'linear', progressive_as_salimans_ho, {**HALF, 'teacher_steps': 2}, 1e-6),
]


@pytest.mark.parametrize('name,interp,reference,o,rtol', CASES,
                         ids=[f'{c[0]}-{c[1][:4]}-{i}' for i, c in enumerate(CASES)])
def test_rule_matches_the_paper_notation(monkeypatch, name, interp, reference, o, rtol):
  monkeypatch.setitem(G.OFF_DIAGONAL, name, reference)
  value, grad, ref_value, ref_grad = G.evaluate_both(name, interp, o)
  assert float(value) > 1e-3
  np.testing.assert_allclose(value, ref_value, rtol=rtol)
  flat, ref_flat = (jax.flatten_util.ravel_pytree(g_)[0] for g_ in (grad, ref_grad))
  scale = float(jnp.max(jnp.abs(ref_flat)))
  np.testing.assert_allclose(flat, ref_flat, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize('interp_name,sigma_d', [('linear', 0.5), ('trigonometric', 0.5),
                                                 ('trigonometric', 1.0)])
def test_trigflow_coordinates_are_the_same_noisy_point(interp_name, sigma_d):
  """x_tau = cos(tau) x_data + sin(tau) sigma_d x0 equals (sigma_d / n_s) I_s, and the returned
  derivatives match central finite differences of tau(s) and of the scale."""
  interp = G.interpolants.get(interp_name)
  s = jnp.linspace(0.05, 0.95, 7)
  tau, cos, sin, scale, dscale, dtau = consistency.trigflow_coordinates(interp, s, sigma_d)
  x0, x1 = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 3))
  x_tau = cos[:, None] * x1 + sin[:, None] * sigma_d * x0
  np.testing.assert_allclose(scale[:, None] * interp.sample(s, x0, x1), x_tau, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(sigma_d * jnp.tan(tau), interp.alpha(s) / interp.beta(s), rtol=1e-12)
  h = 1e-6
  fd = lambda i: (consistency.trigflow_coordinates(interp, s + h, sigma_d)[i]
                  - consistency.trigflow_coordinates(interp, s - h, sigma_d)[i]) / (2 * h)
  np.testing.assert_allclose(dtau, fd(0), rtol=1e-7)
  np.testing.assert_allclose(dscale, fd(3), rtol=1e-6, atol=1e-9)
  if interp_name == 'trigonometric' and sigma_d == 1.0:   # the special case: tau = pi / 2 (1 - s)
    np.testing.assert_allclose(tau, np.pi / 2 * (1 - s), rtol=1e-12)
    np.testing.assert_allclose(dtau, -np.pi / 2, rtol=1e-12)


def test_log_normal_sigma_is_logit_normal_in_linear_time():
  """On the linear interpolant s = 1 / (1 + sigma), so log sigma ~ N(m, v^2) is
  s = sigmoid(-m - v n): ECT's (-1.1, 2.0) is logit-normal(1.1, 2.0) in fmjax time."""
  ctx = consistency.base.Context(None, G.interpolants.get('linear'), None, None)
  key = jax.random.PRNGKey(3)
  s = consistency.sample_times(ctx, key, 16, 'log_normal_sigma', -1.1, 2.0)
  expected = jax.nn.sigmoid(1.1 - 2.0 * jax.random.normal(key, (16,)))
  np.testing.assert_allclose(s, np.clip(expected, 1e-5, 1 - 1e-5), rtol=1e-12)
