import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fmjax import flow_maps, interpolants
from fmjax.models import functional
from fmjax.models.mlp import MLP


def _net(seed=0, dim=3):
  model = MLP(dim, hidden=32, depth=2, time_dim=16, rngs=nnx.Rngs(seed))
  apply, params = functional(model)
  # A non-zero output layer, so that the parameterizations differ from the identity.
  params = jax.tree.map(lambda p: p + 0.1 * jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)
  return apply, params


def _inputs(n=6, dim=3):
  x = jax.random.normal(jax.random.PRNGKey(1), (n, dim))
  s = jnp.linspace(0.05, 0.6, n)
  t = s + jnp.linspace(0.1, 0.35, n)
  return s, t, x


def test_every_parameterization_is_the_identity_on_the_diagonal_and_consistent():
  apply, params = _net()
  s, t, x = _inputs()
  for name in ('displacement', 'meanflow', 'x_prediction'):
    fm = flow_maps.make(name, apply, interpolants.trigonometric())
    np.testing.assert_allclose(fm.X(params, s, s, x), x, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(fm.X(params, s, t, x), x + (t - s)[:, None] * fm.v(params, s, t, x),
                               atol=2e-5, err_msg=name)
    np.testing.assert_allclose(fm.velocity(params, t, x), fm.v(params, t, t, x), atol=1e-6)
    # b_t = d/dt X_{s,t} at t = s, by jvp.
    dX = jax.jvp(lambda tt: fm.X(params, s, tt, x), (s,), (jnp.ones_like(s),))[1]
    np.testing.assert_allclose(dX, fm.velocity(params, s, x), rtol=1e-4, atol=1e-4, err_msg=name)


def test_x_prediction_average_velocity_is_continuous_across_the_diagonal_switch():
  apply, params = _net()
  fm = flow_maps.make('x_prediction', apply, interpolants.linear())
  s, _, x = _inputs()
  gaps = [0.0099, 0.0101, 0.02]
  quotients = [(fm.X(params, s, s + g, x) - x) / g for g in gaps]
  for g, q in zip(gaps, quotients):
    np.testing.assert_allclose(fm.v(params, s, s + g, x), q, rtol=2e-3, atol=2e-3)


def test_meanflow_times_translate_both_ways_and_one_step_matches_meanflow_sampling():
  apply, params = _net()
  fm = flow_maps.MeanFlowMap(apply)
  s, t, x = _inputs()
  r_mf, t_mf = flow_maps.to_meanflow_times(s, t)
  np.testing.assert_allclose(t_mf, 1 - s)
  np.testing.assert_allclose(r_mf, 1 - t)
  back = flow_maps.from_meanflow_times(r_mf, t_mf)
  np.testing.assert_allclose(back[0], s, atol=1e-7)
  np.testing.assert_allclose(back[1], t, atol=1e-7)
  # MeanFlow's one-step sampler: z_0 = z_1 - u(z_1, r=0, t=1) (Geng et al. 2025, Eq. 12).
  zeros, ones = jnp.zeros(6), jnp.ones(6)
  meanflow_sample = x - apply(params, zeros, ones, x, None)
  np.testing.assert_allclose(fm.X(params, zeros, ones, x), meanflow_sample, atol=1e-6)
