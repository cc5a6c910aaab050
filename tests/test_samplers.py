import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fmjax import flow_maps, interpolants, samplers
from fmjax.data import toy
from fmjax.models import functional
from fmjax.models.mlp import MLP

TARGET = toy.GaussianTarget(jnp.array([2.0, -1.0]), jnp.array([0.3, 1.5]))


def test_k_step_sampling_with_the_exact_map_is_exact_for_every_grid():
  interp = interpolants.trigonometric()
  exact = toy.ExactFlowMap(TARGET, interp)
  x0 = jax.random.normal(jax.random.PRNGKey(0), (128, 2))
  one_jump = TARGET.flow_map(interp, 0.0, 1.0, x0)
  for times in (samplers.uniform_grid(1), samplers.uniform_grid(4), jnp.array([0, 0.1, 0.7, 1.0])):
    np.testing.assert_allclose(samplers.flow_map_sample(exact, None, x0, times), one_jump, atol=1e-5)
  # ... and lands on the target's moments.
  samples = samplers.flow_map_sample(exact, None, jax.random.normal(jax.random.PRNGKey(1), (20000, 2)),
                                     samplers.uniform_grid(2))
  np.testing.assert_allclose(samples.mean(0), TARGET.mean, atol=0.05)
  np.testing.assert_allclose(samples.std(0), TARGET.std, rtol=0.03)


def test_ode_solvers_converge_at_their_order():
  interp = interpolants.trigonometric()
  x0 = jax.random.normal(jax.random.PRNGKey(2), (64, 2))
  exact = TARGET.flow_map(interp, 0.0, 0.95, x0)
  velocity = lambda t, x: TARGET.velocity(interp, t, x)
  for method, order in (('euler', 1), ('heun', 2), ('rk4', 4)):
    errors = [float(jnp.abs(samplers.ode_sample(velocity, x0, n, method, t1=0.95) - exact).max())
              for n in (8, 16)]
    observed = np.log2(errors[0] / errors[1])
    assert abs(observed - order) < 0.5, (method, errors, observed)
  assert samplers.ode_nfe(8, 'heun') == 16 and samplers.ode_nfe(8, 'rk4') == 32


def test_jitted_samplers_compile_once_per_shape_and_grid_length():
  traces = []
  model = MLP(2, hidden=16, depth=2, time_dim=8, num_classes=3, rngs=nnx.Rngs(0))
  apply, params = functional(model)
  def counted_apply(*args):
    traces.append(1)
    return apply(*args)
  fm = flow_maps.make('displacement', counted_apply, interpolants.linear())
  sample = samplers.make_flow_map_sampler(fm, null_label=3)
  for seed, times in ((0, samplers.uniform_grid(4)), (1, jnp.array([0.0, 0.2, 0.5, 0.6, 1.0]))):
    x0 = jax.random.normal(jax.random.PRNGKey(seed), (32, 2))
    sample(params, x0, times, jnp.arange(32) % 3)
  assert len(traces) == 1   # the scan traces the network once; the second call reuses it


def test_guidance_scale_one_is_the_conditional_sampler_and_guidance_extrapolates():
  model = MLP(2, hidden=16, depth=2, time_dim=8, num_classes=3, rngs=nnx.Rngs(0))
  apply, params = functional(model)
  params = jax.tree.map(lambda p: p + 0.1 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
  fm = flow_maps.make('displacement', apply, interpolants.linear())
  x0 = jax.random.normal(jax.random.PRNGKey(3), (8, 2))
  labels = jnp.arange(8) % 3
  times = samplers.uniform_grid(1)
  conditional = samplers.flow_map_sample(fm, params, x0, times, labels, null_label=3)
  np.testing.assert_allclose(conditional, x0 + fm.v(params, 0.0, 1.0, x0, labels), atol=1e-6)
  unconditional = x0 + fm.v(params, 0.0, 1.0, x0, jnp.full((8,), 3))
  guided = samplers.flow_map_sample(fm, params, x0, times, labels, null_label=3, guidance_scale=3.0)
  np.testing.assert_allclose(guided, unconditional + 3.0 * (conditional - unconditional), atol=1e-5)


def test_a_traced_step_count_gives_the_uniform_grid_samplers():
  """flow_map_sample(num_steps=k) and ode_sample with k traced (one compilation for every k)
  equal the explicit uniform grid and the static step count."""
  model = MLP(2, hidden=16, depth=2, time_dim=8, num_classes=0, rngs=nnx.Rngs(0))
  apply, params = functional(model)
  params = jax.tree.map(lambda p: p + 0.1 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
  fm = flow_maps.make('displacement', apply, interpolants.linear())
  x0 = jax.random.normal(jax.random.PRNGKey(4), (16, 2))
  # One trace per jitted function for every k = one compilation (a Python-side count: jit's own
  # cache counter reads 0 when another test in the same process has left its fast path off).
  traces = {'map': 0, 'ode': 0}

  def counted(name, fn):
    def wrapped(k):
      traces[name] += 1
      return fn(k)
    return wrapped
  traced = jax.jit(counted('map', lambda k: samplers.flow_map_sample(fm, params, x0, num_steps=k)))
  velocity = lambda t, x: fm.velocity(params, t, x)
  ode = jax.jit(counted('ode', lambda k: samplers.ode_sample(velocity, x0, k, 'midpoint')))
  for k in (1, 3, 5):
    want = samplers.flow_map_sample(fm, params, x0, samplers.uniform_grid(k))
    np.testing.assert_allclose(traced(k), want, atol=1e-5)
    # By hand: k midpoint steps of size 1/k.
    x = x0
    for i in range(k):
      s = jnp.full((16,), i / k)
      x = x + velocity(s + 0.5 / k, x + 0.5 / k * velocity(s, x)) / k
    np.testing.assert_allclose(ode(k), x, atol=1e-5)
  assert float(jnp.abs(traced(3) - traced(1)).max()) > 1e-3   # k matters
  assert traces == {'map': 1, 'ode': 1}
  with pytest.raises(ValueError, match='either times'):
    samplers.flow_map_sample(fm, params, x0, samplers.uniform_grid(2), num_steps=2)


def _affine_jump(s, t, x, labels):
  """A jump whose result depends on s, t, x and the labels (not a flow map: any transport)."""
  return x * (1.0 + 0.3 * (t - s))[:, None] + (t ** 2 - s)[:, None] + 0.1 * labels[:, None]


def test_flow_map_steps_hook_and_carry_against_a_plain_loop():
  """The shared k-step loop with a hook: the hook sees (i, s, t, x_i, jump(x_i)) after each jump,
  its x replaces x_{i+1}, its carry threads through; both paths (fori and unrolled) equal a
  numpy loop on a non-uniform grid."""
  grid = [0.0, 0.15, 0.5, 0.8, 1.0]
  x0 = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)), jnp.float32)
  labels = jnp.asarray([0.0, 1.0, 2.0])

  def hook(i, s, t, before, after, carry):
    return after - 0.05 * before + 0.01 * i, carry + jnp.sum(after * t[:, None]) + i

  x, carry = np.asarray(x0, np.float64), 0.0
  for i, (s, t) in enumerate(zip(grid[:-1], grid[1:])):
    after = x * (1 + 0.3 * (t - s)) + (t ** 2 - s) + 0.1 * np.asarray(labels)[:, None]
    carry += np.sum(after * t) + i
    x = after - 0.05 * x + 0.01 * i
  for unroll in (False, True):
    got, got_carry = samplers.flow_map_steps(_affine_jump, x0, grid, labels, step_hook=hook,
                                             carry=jnp.zeros(()), unroll=unroll)
    np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_carry, carry, rtol=1e-5)
  # Without a hook: x_k alone, and a traced step count gives the uniform grid's answer.
  plain = jax.jit(lambda k: samplers.flow_map_steps(_affine_jump, x0, labels=labels, num_steps=k))
  unrolled = samplers.flow_map_steps(_affine_jump, x0, [0.0, 1 / 3, 2 / 3, 1.0], labels, unroll=True)
  np.testing.assert_allclose(plain(3), unrolled, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError):   # the unrolled loop needs a concrete grid
    jax.jit(lambda g: samplers.flow_map_steps(_affine_jump, x0, g, labels, unroll=True))(jnp.asarray(grid))
