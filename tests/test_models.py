"""Networks: shapes, two-time conditioning, null label, jvp vs finite differences, mixed
precision, parameter counts of the standard sizes, and one training step under each jvp rule."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fmjax import models

NUM_CLASSES = 3
BATCH = 2
# Tiny configurations of every network. The DiT uses the blockwise custom-jvp attention, the
# U-Net the naive one (both are checked against each other in test_attention.py).
NETS = {
    'mlp': ('mlp-tiny', {}),
    'unet': ('unet-tiny', {}),
    'dit': ('DiT-tiny', dict(depth=1, attention='blockwise', attention_options=dict(block_size=8))),
    # One level (no resampling; the mid block keeps attention) for the costly training step.
    'unet-1level': ('unet-tiny', dict(channel_mult=(1,), attn_resolutions=())),
}


def _jit(fn, **kwargs):
  # Test programs run once on tiny inputs: compile them without backend optimization.
  return jax.jit(fn, compiler_options=models.FAST_COMPILE, **kwargs)


def _random_params(abstract_state, seed=0):
  """Random parameters of the right shapes, without compiling an initializer.

  Kernels and embeddings ~ N(0, 1 / fan_in), norm scales ~ 1 + N(0, 0.05^2), biases
  ~ N(0, 0.05^2). Unlike the real initialization nothing is zero (the zero-initialized
  output layers would make every network the zero function and every test below vacuous).
  """
  rng = np.random.default_rng(seed)
  def draw(path, leaf):
    name = str(path[-1])
    shape = leaf.shape
    if 'scale' in name:
      value = 1.0 + 0.05 * rng.standard_normal(shape)
    elif 'bias' in name:
      value = 0.05 * rng.standard_normal(shape)
    else:
      fan_in = int(np.prod(shape[:-1])) if 'embedding' not in name else 1
      value = rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
    return jnp.asarray(value, leaf.dtype)
  return jax.tree.map_with_path(draw, abstract_state)


@functools.lru_cache(maxsize=None)
def _net(name, **overrides):
  """(apply, jitted apply, params, x). `overrides` change static settings only (dtype,
  dropout, time conditioning), so every variant runs the same parameters."""
  preset, config = NETS[name]
  module = models.abstract(preset, num_classes=NUM_CLASSES, **{**config, **overrides})
  graphdef, state = nnx.split(module)
  params = _random_params(nnx.split(models.abstract(preset, num_classes=NUM_CLASSES, **config))[1])
  x = models.example_input(module, BATCH)
  apply = lambda params, s, t, x, labels=None, **kw: nnx.merge(graphdef, params)(s, t, x, labels, **kw)
  return apply, _jit(apply), params, x


def _rel(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.parametrize('name', ['mlp', 'unet', 'dit'])
def test_shapes_two_times_and_null_label(name):
  _, apply, params, x = _net(name)
  s, t = jnp.array([0.1, 0.2]), jnp.array([0.9, 0.7])
  labels = jnp.array([0, 2])
  out = apply(params, s, t, x, labels)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out)))
  # Each of the two times changes the output.
  assert _rel(apply(params, s + 0.2, t, x, labels), out) > 1e-3
  assert _rel(apply(params, s, t - 0.2, x, labels), out) > 1e-3
  # The null label is `num_classes`: it changes the output, and labels=None means it.
  null = apply(params, jnp.full((BATCH,), 0.1), jnp.full((BATCH,), 0.9), x, jnp.full((BATCH,), NUM_CLASSES))
  assert _rel(null, apply(params, 0.1, 0.9, x, jnp.zeros((BATCH,), jnp.int32))) > 1e-3
  # Scalar times broadcast over the batch.
  np.testing.assert_allclose(apply(params, 0.1, 0.9, x, None), null, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ['mlp', 'unet', 'dit'])
def test_t_gap_conditioning_is_s_t_conditioning_of_t_and_gap(name):
  """With the same parameters, the 't_gap' network at (s, t) is the 's_t' network at (t, t - s)."""
  _, apply, params, x = _net(name)
  _, gap_apply, _, _ = _net(name, time_conditioning='t_gap')
  s, t, labels = jnp.array([0.1, 0.3]), jnp.array([0.6, 0.35]), jnp.array([0, 2])
  np.testing.assert_allclose(gap_apply(params, s, t, x, labels), apply(params, t, t - s, x, labels),
                             rtol=1e-5, atol=1e-6)


@functools.lru_cache(maxsize=None)
def _jvp(name, **overrides):
  """Jitted (s, t, x, ds, dt, dx) -> jvp of the network, shared by the tests below."""
  apply, _, params, x = _net(name, **overrides)
  labels = jnp.array([1, NUM_CLASSES])
  f = lambda s, t, x: apply(params, s, t, x, labels)
  return _jit(lambda *a: jax.jvp(f, a[:3], a[3:])), _jit(f), x


S, T = jnp.array([0.2, 0.5]), jnp.array([0.8, 0.6])


@pytest.mark.parametrize('name', ['mlp', 'unet', 'dit'])
def test_jvp_matches_central_finite_differences(name):
  """d/deps net(s + eps ds, t + eps dt, x + eps dx): the Lagrangian and Eulerian tangents at once."""
  jvp, f, x = _jvp(name)
  ds, dt = jnp.array([1.0, -0.5]), jnp.array([0.7, 1.0])
  dx = jax.random.normal(jax.random.key(3), x.shape)
  _, tangent = jvp(S, T, x, ds, dt, dx)
  # Five-point central differences: the sinusoidal time features reach frequency 1000, so
  # the step must be small, and the fourth-order stencil keeps truncation error negligible.
  h = 2e-4
  g = lambda e: f(S + e * ds, T + e * dt, x + e * dx)
  fd = (8 * (g(h) - g(-h)) - (g(2 * h) - g(-2 * h))) / (12 * h)
  assert float(jnp.linalg.norm(tangent)) > 1e-3
  assert _rel(tangent, fd) < 1e-2


@pytest.mark.parametrize('name', ['mlp', 'unet', 'dit'])
def test_bfloat16_compute_keeps_float32_params_and_times(name):
  jvp16, _, x = _jvp(name, dtype=jnp.bfloat16)
  jvp32, _, _ = _jvp(name)
  params16 = nnx.state(models.abstract(NETS[name][0], dtype=jnp.bfloat16, **NETS[name][1]))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params16))
  # d/dt with a bf16 network: times stay float32, so the derivative is the float32 one, roughly.
  zero_s, zero_x = jnp.zeros_like(S), jnp.zeros_like(x)
  (out16, d16), (out32, d32) = (fn(S, T, x, zero_s, jnp.ones_like(T), zero_x) for fn in (jvp16, jvp32))
  assert out16.dtype == d16.dtype == jnp.float32      # outputs come back in the input's dtype
  assert _rel(out16, out32) < 5e-2
  assert bool(jnp.all(jnp.isfinite(d16)))
  assert _rel(d16, d32) < 1e-1


def test_unet_dropout_needs_a_key_and_is_reproducible():
  apply, _, params, x = _net('unet', dropout=0.5)
  run = _jit(lambda key: apply(params, 0.1, 0.9, x, None, key=key))
  plain = _net('unet')[1](params, 0.1, 0.9, x, None)     # no key: the deterministic network
  a, b = run(jax.random.key(0)), run(jax.random.key(1))
  np.testing.assert_allclose(run(jax.random.key(0)), a)
  assert _rel(a, plain) > 1e-3 and _rel(a, b) > 1e-3


@pytest.mark.parametrize('name, expected', [
    ('unet-cifar10', 55.7e6),   # EDM's DDPM++ CIFAR-10 (Karras et al. 2022): 55.7M
    ('DiT-B/2', 130e6),         # Peebles & Xie 2023, Table 1 (with learned sigma: +tiny)
    ('DiT-L/2', 458e6),
    ('DiT-XL/2', 675e6),
])
def test_parameter_counts_of_standard_sizes(name, expected):
  # From shapes only: nothing of this size is ever allocated here. The DiTs add a second
  # timestep embedder (two times) and predict no sigma: within 1% of the paper's numbers.
  kwargs = dict(num_classes=1000) if name.startswith('DiT') else {}
  assert abs(models.param_count(name, **kwargs) / expected - 1) < 0.01


def test_registry_errors_and_names():
  with pytest.raises(ValueError, match='Unknown network'):
    models.build('resnet')
  assert models.resolve('dit-xl/2')[1]['hidden'] == 1152
  assert models.resolve('unet', model_channels=8) == ('unet', {'model_channels': 8})
  with pytest.raises(ValueError, match='NHWC'):
    models.abstract('unet-tiny')(0.0, 1.0, jnp.zeros((1, 8, 8, 1)))
  with pytest.raises(ValueError, match='time conditioning'):
    models.build('DiT-tiny', time_conditioning='st')
  apply, params, x = models.build_for_benchmark('mlp', 'tiny', batch=3)
  assert jax.eval_shape(apply, params, 0.0, 1.0, x, None).shape == x.shape == (3, 2)


# ---------------------------------------------------------------- one step of every jvp rule

JVP_RULES = ('lsd', 'esd', 'meanflow', 'imf', 'sct', 'lmd', 'emd')
TEACHER_RULES = ('lmd', 'emd')


# Every jvp rule on the MLP, the DiT (with the blockwise custom-jvp attention) and a one-level
# U-Net without attention (its residual blocks and time/label conditioning; the full U-Net's
# grad-of-jvp takes minutes to compile on a CPU, and attention under jvp is covered by the DiT
# cases and tests/test_attention.py).
STEP_CASES = ([('mlp', r) for r in JVP_RULES] + [('dit', r) for r in JVP_RULES]
              + [('unet-1level', r) for r in JVP_RULES])


@pytest.mark.parametrize('name, rule_name', STEP_CASES)
def test_one_training_step_under_each_jvp_rule(name, rule_name):
  from fmjax import flow_maps, interpolants, losses
  apply, _, params, x = _net(name)
  interpolant = interpolants.get('linear')
  flow_map = flow_maps.make('displacement', apply, interpolant)
  teacher = None
  if rule_name in TEACHER_RULES:
    teacher_params = _random_params(params, seed=7)
    teacher = lambda t, x, labels: flow_map.velocity(teacher_params, t, x, labels)
  rule = losses.make(rule_name, flow_map, interpolant, teacher=teacher)
  state = rule.init(params, jax.random.key(0))
  optimizer = optax.adam(1e-3)
  opt_state = optimizer.init(state)
  batch = {'x1': x, 'labels': jnp.array([0, 2])}

  @_jit
  def step(state, opt_state, key):
    (loss, _), grads = jax.value_and_grad(rule, has_aux=True)(state, batch, key)
    updates, opt_state = optimizer.update(grads, opt_state, state)
    return loss, grads, optax.apply_updates(state, updates), opt_state

  loss, grads, new_state, opt_state = step(state, opt_state, jax.random.key(1))
  loss_after, *_ = step(new_state, opt_state, jax.random.key(1))
  grad_norm = optax.tree.norm(grads)
  assert np.isfinite(float(loss)) and np.isfinite(float(loss_after)) and np.isfinite(float(grad_norm))
  assert float(grad_norm) > 0
  assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(new_state))
