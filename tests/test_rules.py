"""Every rule vanishes on the exact flow map of a Gaussian target and is positive off it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fmjax import flow_maps, interpolants, losses
from fmjax.data import toy
from fmjax.losses import eulerian
from fmjax.models import functional
from fmjax.models.mlp import MLP

TARGET = toy.GaussianTarget(jnp.array([1.0, -2.0, 0.5]), jnp.array([0.5, 2.0, 1.0]))
INTERPOLANTS = ['linear', 'trigonometric']
# Rules whose residual vanishes exactly on the exact map (with the exact teacher where they
# take one, which makes their diagonal term exact too).
SELF_RULES = ['lsd', 'esd', 'psd', 'shortcut']
TEACHER_RULES = ['flow_matching', 'meanflow', 'imf', 'sct', 'lmd', 'emd', 'trajectory_distillation']
VARIANTS = [('lsd', {'grad_through_jvp': False}), ('esd', {'eulerian_gradient': 'primal'}),
            ('esd', {'eulerian_gradient': 'residual'}), ('psd', {'intermediate': 'midpoint'}),
            ('psd', {'space': 'v'}), ('sct', {'tangent_normalization': 0.0, 'warmup_steps': 0}),
            ('sct', {'tangent_form': 'displacement', 'time_sampling': 'times', 'warmup_steps': 0}),
            ('trajectory_distillation', {'ode_steps': 8, 'ode_method': 'rk4'})]
# Heun's O(h^2) error on the teacher ODE is above 1e-8; RK4 is not.
# sCT's exact map is a fixed point of the full tangent only: no warmup (r = 1).
EXACT_OPTIONS = {'trajectory_distillation': {'ode_method': 'rk4'}, 'sct': {'warmup_steps': 0}}


def _batch(n=64, seed=1):
  return {'x1': TARGET.sample(jax.random.PRNGKey(seed), n)}


def _loss(name, flow_map, interp, **options):
  teacher = toy.ExactFlowMap(TARGET, interp).teacher
  if losses.RULES[name].teacher == 'none':
    teacher = None
    options.setdefault('diagonal_fraction', 0.0)   # the diagonal term of a self rule regresses onto dI/dt
  rule = losses.make(name, flow_map, interp, teacher=teacher, **options)
  loss, metrics = rule(rule.init({}), _batch(), jax.random.PRNGKey(2))   # eager: no compile per case
  return float(loss), metrics


@pytest.mark.parametrize('interp_name', INTERPOLANTS)
@pytest.mark.parametrize('name', SELF_RULES + TEACHER_RULES)
def test_rule_vanishes_on_the_exact_map_and_not_on_a_perturbed_one(name, interp_name):
  interp = interpolants.get(interp_name)
  options = EXACT_OPTIONS.get(name, {})
  exact, _ = _loss(name, toy.ExactFlowMap(TARGET, interp), interp, **options)
  perturbed, _ = _loss(name, toy.ExactFlowMap(TARGET, interp, perturbation=0.3), interp, **options)
  assert exact < 1e-8, (name, exact)
  assert perturbed > 1e-4, (name, perturbed)
  assert perturbed > 1e4 * max(exact, 1e-12)


@pytest.mark.parametrize('name,options', VARIANTS)
def test_rule_variants_vanish_on_the_exact_map(name, options):
  interp = interpolants.linear()
  exact, _ = _loss(name, toy.ExactFlowMap(TARGET, interp), interp, **options)
  perturbed, _ = _loss(name, toy.ExactFlowMap(TARGET, interp, perturbation=0.3), interp, **options)
  assert exact < 1e-8 < 1e-4 < perturbed, (name, options, exact, perturbed)


def test_progressive_distillation_vanishes_with_an_exact_teacher_map():
  interp = interpolants.linear()
  exact_map = lambda s, t, x, labels: TARGET.flow_map(interp, s, t, x)
  for perturbation, check in ((0.0, lambda l: l < 1e-9), (0.1, lambda l: l > 1e-4)):
    flow_map = toy.ExactFlowMap(TARGET, interp, perturbation=perturbation)
    loss, _ = _loss('progressive', flow_map, interp, teacher_map=exact_map)
    assert check(loss), (perturbation, loss)


def test_progressive_distillation_from_a_velocity_converges_with_teacher_steps():
  # The teacher map is `teacher_steps` Heun steps per half jump: Heun is order 2, so the
  # target's error, and the rule's residual on the exact map, fall ~4x (loss ~16x) per
  # doubling of the steps, and the default leaves a residual far below the perturbed map's.
  interp = interpolants.linear()
  exact = toy.ExactFlowMap(TARGET, interp)
  losses_by_steps = [_loss('progressive', exact, interp, teacher_steps=n)[0] for n in (1, 2, 4, 8, 16)]
  ratios = np.array(losses_by_steps[:-1]) / np.array(losses_by_steps[1:])
  assert np.all(ratios > 10) and np.all(ratios < 40), (losses_by_steps, ratios)
  default, _ = _loss('progressive', exact, interp)
  assert default == losses_by_steps[3]
  assert default < 1e-6 and losses_by_steps[0] > 1e3 * default
  perturbed, _ = _loss('progressive', toy.ExactFlowMap(TARGET, interp, perturbation=0.3), interp)
  assert perturbed > 1e4 * default


def test_discrete_consistency_residual_shrinks_with_the_gap():
  """ECT/CD is the finite-difference Eulerian rule: its per-row loss is O(gap) on the exact
  map (Euler's O(gap^2) error divided by the gap) and O(1) on a perturbed map."""
  interp = interpolants.linear()
  def at_gap(gap, perturbation):
    flow_map = toy.ExactFlowMap(TARGET, interp, perturbation=perturbation)
    # A tiny Huber c keeps the distance in its linear regime, |err|.
    rule = losses.make('ect', flow_map, interp, teacher=flow_map.teacher, min_gap=gap,
                       gap_schedule='linear_time',
                       gap_halving_steps=1, times={'name': 'uniform'}, time_sampling='times',
                       huber_c=1e-9)
    batch = {**_batch(), 'step': jnp.array(60)}   # the gap has shrunk to min_gap
    return float(rule(rule.init({}), batch, jax.random.PRNGKey(3))[0])
  ratio = at_gap(0.02, 0.0) / at_gap(0.01, 0.0)
  assert 1.6 < ratio < 2.5, ratio
  perturbed_ratio = at_gap(0.02, 0.1) / at_gap(0.01, 0.1)
  assert 0.8 < perturbed_ratio < 1.3, perturbed_ratio   # does not vanish with the gap


def test_meanflow_identity_is_the_eulerian_residual_and_matches_meanflows_own_algorithm():
  """Geng et al. 2025, Alg. 1, in their time convention, against fmjax's Eulerian residual."""
  model = MLP(3, hidden=32, depth=2, time_dim=16, rngs=nnx.Rngs(0))
  apply, params = functional(model)
  params = jax.tree.map(lambda p: p + 0.05 * jnp.sin(jnp.arange(p.size).reshape(p.shape)), params)
  fm = flow_maps.MeanFlowMap(apply)
  interp = interpolants.linear()
  keys = jax.random.split(jax.random.PRNGKey(4), 3)
  x_data, noise = TARGET.sample(keys[0], 16), jax.random.normal(keys[1], (16, 3))
  s = jax.random.uniform(keys[2], (16,), minval=0.05, maxval=0.5)
  t = s + 0.4
  # MeanFlow: z = (1 - t') x + t' e, v = e - x, (u, du/dt) = jvp(u, (z, r, t), (v, 0, 1)).
  r_mf, t_mf = flow_maps.to_meanflow_times(s, t)
  z = (1 - t_mf)[:, None] * x_data + t_mf[:, None] * noise
  v_mf = noise - x_data
  u, du_dt = jax.jvp(lambda zz, rr, tt: apply(params, rr, tt, zz, None), (z, r_mf, t_mf),
                     (v_mf, jnp.zeros_like(r_mf), jnp.ones_like(t_mf)))
  meanflow_error = u - (v_mf - (t_mf - r_mf)[:, None] * du_dt)
  # fmjax: the same point and conditional velocity in fmjax time, MeanFlow's gradient placement.
  x_s = interp.sample(s, noise, x_data)
  np.testing.assert_allclose(x_s, z, atol=1e-6)
  w = interp.time_derivative(s, noise, x_data)
  error = eulerian.eulerian_error(fm, params, s, t, x_s, None, w, 'primal')
  np.testing.assert_allclose(error, -meanflow_error, rtol=1e-4, atol=1e-5)
  # ... and the value is the Eulerian residual d/ds X + grad X w, from two separate jvps.
  dX_ds = jax.jvp(lambda ss: fm.X(params, ss, t, x_s), (s,), (jnp.ones_like(s),))[1]
  transport = jax.jvp(lambda xx: fm.X(params, s, t, xx), (x_s,), (w,))[1]
  np.testing.assert_allclose(error, -(dX_ds + transport), rtol=1e-4, atol=1e-5)


def _mlp_flow_map(num_classes=0, dtype=jnp.float32):
  model = MLP(3, hidden=32, depth=2, time_dim=16, num_classes=num_classes, dtype=dtype,
              rngs=nnx.Rngs(0))
  apply, params = functional(model)
  # Move off the zero-initialized output layer, where every residual is trivially zero.
  params = jax.tree.map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size).reshape(p.shape)).astype(p.dtype),
                        params)
  return flow_maps.make('displacement', apply, interpolants.linear()), params


@pytest.mark.parametrize('name', sorted(losses.RULES))
def test_every_rule_jits_with_and_without_labels_and_has_finite_gradients(name):
  flow_map, net_params = _mlp_flow_map(num_classes=4)
  teacher = None
  if losses.RULES[name].teacher != 'none':
    teacher = toy.ExactFlowMap(TARGET, interpolants.linear()).teacher
  options = {'label_dropout': 0.2, 'null_label': 4, 'weighting': 'learned'}
  rule = losses.make(name, flow_map, interpolants.linear(), teacher=teacher, **options)
  params = rule.init(net_params, jax.random.PRNGKey(0))
  grad_fn = jax.jit(jax.value_and_grad(rule, has_aux=True))
  batch = {'x1': TARGET.sample(jax.random.PRNGKey(5), 16), 'labels': jnp.arange(16) % 4}
  (loss, metrics), grads = grad_fn(params, batch, jax.random.PRNGKey(6))
  assert np.isfinite(float(loss)) and float(metrics['loss']) == float(loss)
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and max(norms) > 0
  # Without labels it traces and lowers too (compiling it again would only cost CI time).
  unlabeled = {'x1': batch['x1']}
  assert 'stablehlo' in grad_fn.lower(params, unlabeled, jax.random.PRNGKey(6)).as_text()[:20000]


def test_meanflow_guidance_reduces_to_the_plain_rule():
  flow_map, net_params = _mlp_flow_map(num_classes=4)
  interp = interpolants.linear()
  batch = {'x1': TARGET.sample(jax.random.PRNGKey(5), 32), 'labels': jnp.arange(32) % 4}
  def loss(**options):
    rule = losses.make('meanflow', flow_map, interp, null_label=4, **options)
    return float(rule(rule.init(net_params), batch, jax.random.PRNGKey(7))[0])
  plain = loss()
  assert loss(omega=1.0, kappa=0.0) == plain
  guided = loss(omega=2.0, kappa=0.5)
  assert abs(guided - plain) > 1e-6 * plain
  # On rows whose label is null the target is left alone.
  null_batch = {**batch, 'labels': jnp.full((32,), 4)}
  rule_plain = losses.make('meanflow', flow_map, interp, null_label=4)
  rule_guided = losses.make('meanflow', flow_map, interp, null_label=4, omega=3.0)
  np.testing.assert_allclose(rule_plain(rule_plain.init(net_params), null_batch, jax.random.PRNGKey(7))[0],
                             rule_guided(rule_guided.init(net_params), null_batch, jax.random.PRNGKey(7))[0],
                             rtol=1e-6)


def test_gradient_placements_share_a_value_but_not_a_gradient():
  flow_map, net_params = _mlp_flow_map()
  interp = interpolants.linear()
  batch = _batch(32)
  results = {}
  for gradient in eulerian.GRADIENTS:
    rule = losses.make('esd', flow_map, interp, eulerian_gradient=gradient, diagonal_fraction=0.0)
    (loss, _), grads = jax.value_and_grad(rule, has_aux=True)(rule.init(net_params), batch,
                                                               jax.random.PRNGKey(8))
    results[gradient] = (float(loss), jax.flatten_util.ravel_pytree(grads)[0])
  values = [v for v, _ in results.values()]
  np.testing.assert_allclose(values, values[0], rtol=1e-4)
  assert float(jnp.linalg.norm(results['primal'][1] - results['residual'][1])) > 1e-3 * float(
      jnp.linalg.norm(results['residual'][1]))


def test_jvp_time_derivatives_match_central_differences():
  # float64, so that a step of 1e-6 leaves truncation (h^2 f''' / 6) and rounding errors small.
  with jax.enable_x64(True):
    flow_map, params = _mlp_flow_map(dtype=jnp.float64)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    s = jnp.full((8,), 0.2, jnp.float64)
    x = TARGET.sample(jax.random.PRNGKey(9), 8).astype(jnp.float64)
    t = jnp.linspace(0.3, 0.9, 8, dtype=jnp.float64)
    h = 1e-6
    _, dX = jax.jvp(lambda tt: flow_map.X(params, s, tt, x), (t,), (jnp.ones_like(t),))
    fd = (flow_map.X(params, s, t + h, x) - flow_map.X(params, s, t - h, x)) / (2 * h)
    assert float(jnp.abs(dX).max()) > 0.1
    np.testing.assert_allclose(dX, fd, rtol=1e-5, atol=1e-7)
    # The Eulerian total derivative along (1, w) against a central difference in (s, x).
    w = jnp.cos(x)
    _, D = eulerian.total_derivative(lambda ss, xx: flow_map.X(params, ss, t, xx), s, x, w)
    fd = (flow_map.X(params, s + h, t, x + h * w) - flow_map.X(params, s - h, t, x - h * w)) / (2 * h)
    np.testing.assert_allclose(D, fd, rtol=1e-5, atol=1e-7)


def test_bad_options_fail_with_the_valid_names():
  flow_map, _ = _mlp_flow_map()
  interp = interpolants.linear()
  with pytest.raises(ValueError, match='grad_through_jvp'):
    losses.make('lsd', flow_map, interp, grad_through_jvpp=True)
  with pytest.raises(ValueError, match='Unknown loss'):
    losses.make('lsd2', flow_map, interp)
  with pytest.raises(ValueError, match='teacher'):
    losses.make('lmd', flow_map, interp)
  with pytest.raises(ValueError, match='null_label'):
    losses.make('meanflow', flow_map, interp, omega=2.0)
  with pytest.raises(ValueError, match='intermediate'):
    losses.make('shortcut', flow_map, interp, intermediate='uniform')


def test_a_rule_compiles_once_for_every_batch_of_a_shape():
  flow_map, net_params = _mlp_flow_map()
  traces = []
  rule = losses.make('lsd', flow_map, interpolants.linear())
  def counted(params, batch, key):
    traces.append(1)
    return rule(params, batch, key)
  step = jax.jit(counted)
  params = rule.init(net_params)
  for seed in range(3):
    step(params, _batch(16, seed), jax.random.PRNGKey(seed))
  assert len(traces) == 1


def test_fmm_is_a_deprecated_alias_of_trajectory_distillation():
  # "Flow map matching" names the framework of Boffi et al. 2406.07507, not this rule.
  interp = interpolants.linear()
  flow_map = toy.ExactFlowMap(TARGET, interp, perturbation=0.3)
  with pytest.warns(DeprecationWarning, match='trajectory_distillation'):
    old, _ = _loss('fmm', flow_map, interp)
  new, _ = _loss('trajectory_distillation', flow_map, interp)
  assert old == new > 1e-4
