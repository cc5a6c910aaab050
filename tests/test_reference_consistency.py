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

sg = jax.lax.stop_gradient
HALF = {'diagonal_fraction': 0.5}


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


def ect_in_edm_sigma(p, x0, x1, y, key, step, o, use_teacher):
  """ECT (Geng et al. 2406.14548; locuslab/ect training/loss.py, ECMLoss with the sigmoid
  mapping) in EDM noise level on the linear interpolant: x_t = y + t eps, f(x, t) the
  consistency function, r = max(0, t (1 - q^-(k+1) (1 + 8 sigmoid(-t)))), k = floor(step / d),
  loss pseudo-Huber(f(x_t, t) - sg f(x_r, r)) / (t - r).
  fmjax's I_s = (1 - s) eps + s y = x_t / (1 + t) with t = (1 - s) / s, so
  f(x, t) = X_{1 / (1 + t), 1}(x / (1 + t)); f(x, 0) = x (the data)."""
  del use_teacher
  s = G.UNIFORM.sample(key, x0.shape[0])   # the rule's time draw, read as a noise level
  t = (1 - s) / s
  q, d = o.get('gap_decay', 2.0), o.get('gap_halving_steps', 25_000)
  k = step // d
  r = jnp.maximum(0.0, t * (1 - (1 + 8 / (1 + jnp.exp(t))) / q ** (k + 1)))
  eps, data = x0, x1
  one = jnp.ones_like(t)

  def f(x, sigma):
    return G.X(p, 1 / (1 + sigma), one, x / (1 + sigma)[:, None], y)

  err = f(data + t[:, None] * eps, t) - sg(f(data + r[:, None] * eps, r))
  c = o.get('huber_c', 0.00054)
  return (jnp.sqrt(G.msq(err) + c**2) - c) / (t - r), s, one


def sct_in_trigflow_time(p, x0, x1, y, key, step, o, use_teacher):
  """sCT (Lu & Song 2410.11081) in TrigFlow time tau = pi / 2 (1 - s) on the trigonometric
  interpolant, x_tau = cos(tau) data + sin(tau) noise: the consistency condition
  df(x_tau, tau)/dtau = 0 along dx_tau/dtau = cos(tau) noise - sin(tau) data, the
  derivative by a central finite difference (h = 1e-5). fmjax's g = -df/ds = (pi / 2) df/dtau
  (no warmup: r = 1); normalized g / (|g| + c), loss |f - sg(f) + sg(g)|^2 on f's own v."""
  del step
  s = G.UNIFORM.sample(key, x0.shape[0])
  tau = np.pi / 2 * (1 - s)
  noise, data = x0, x1
  x_tau = jnp.cos(tau)[:, None] * data + jnp.sin(tau)[:, None] * noise
  dx = jnp.cos(tau)[:, None] * noise - jnp.sin(tau)[:, None] * data
  if use_teacher:   # sCD: the teacher's velocity in fmjax time, ds/dtau = -2 / pi
    dx = -2 / np.pi * o['teacher_fn'](s, x_tau, y)
  one = jnp.ones_like(s)
  f = lambda x, tt: G.X(p, 1 - 2 * tt / np.pi, one, x, y)
  h = 1e-5
  df = (f(x_tau + h * dx, tau + h) - f(x_tau - h * dx, tau - h)) / (2 * h)
  g = sg(np.pi / 2 * df)
  c = o.get('tangent_normalization', 0.1)
  if c > 0:
    g = g / (jnp.sqrt(G.msq(g))[:, None] + c)
  v = G.apply(p, s, one, x_tau, y)   # f = x + (1 - s) v: the gradient flows through v
  return G.msq(v - sg(v) + g), s, one


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
    ('ect', 'linear', ect_in_edm_sigma, {**HALF, 'step': 0}, 1e-10),
    ('sct', 'trigonometric', sct_in_trigflow_time, {**HALF}, 1e-6),
    ('sct', 'trigonometric', sct_in_trigflow_time, {**HALF, 'tangent_normalization': 0.0,
                                                    'teacher': True}, 1e-6),
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
