"""Improved MeanFlow (iMF) with guidance as a network input, written plainly against fmjax.

The reference below is iMF's training step in its own notation and time direction (t = 1
noise, z_t = (1 - t) x + t e, v = e - x, average velocity u(z, r, t)), written from the
official code (Lyy-iiis/imeanflow, imf.py: `sample_tr`, `sample_cfg_scale`,
`sample_cfg_interval`, `guidance_fn`, `forward`; the paper, arXiv 2512.02012, is not
re-checked here):

  omega with density ∝ omega^-beta on [1, 1 + s_max]; t_min ~ U[0, 1/2], t_max ~ U[1/2, 1]
  (t_min = 0, t_max = 1 on the r = t rows); w = omega on t_min <= t <= t_max, else 1;
  v_c = v(z, t | y, w), v_u = v(z, t | null, 1) (the model's velocity: the auxiliary head when
  there is one, else u(z, t, t)); v_g = v + (1 - 1/w)(v_c - v_u), v_g = v on null rows;
  V = u(z, r, t | y, omega, t_min, t_max) + (t - r) sg[du/dt along (v_c, dt = 1, dr = 0)];
  loss = E[ wt(|V - v_g|^2) + lambda wt(|v_head(z, r, t | ...) - v_g|^2) ],  wt(a) = a / sg(a + c).

du/dt is a central finite difference in float64 (no jvp); the gradients are jax.grad through
the finite-difference expressions. The random numbers are fmjax's (its keys, transformed into
the reference's draws where the time direction differs), so a changed distribution fails.
The network reads the interval in fmjax time, (start, end) = (1 - t_max, 1 - t_min).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fmjax import conditioning, configs, flow_maps, interpolants, losses, models, samplers
from fmjax.losses import eulerian
from fmjax.losses import imf as imf_lib

import test_reference_meanflow as R
import test_rule_gradients as G

sg = jax.lax.stop_gradient
B, D, H, NULL = G.B, G.D, G.H, G.NULL
FD_STEP = R.FD_STEP


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


# ------------------------------------------------------------- a guidance-conditioned network


def init_net(key):
  """The gradient tests' float64 tanh MLP, plus guidance weights and an auxiliary output layer."""
  k = jax.random.split(key, 4)
  return {**G.init_net(k[0]), 'guidance': 0.8 * jax.random.normal(k[1], (3, H)),
          'w2v': jax.random.normal(k[2], (H, D)) / np.sqrt(H), 'b2v': 0.3 * jax.random.normal(k[3], (D,))}


def apply(p, a, b, x, labels=None, head='average'):
  """net(a, b, x | c, omega, start, end): (1 - 1/omega, start, end) @ W enters the hidden layer
  (through a per-row bias of the gradient tests' MLP); head 'velocity' is the auxiliary output,
  'both' the pair (the networks' contract: fmjax.models.guidance_embedding.HEADS)."""
  if head == 'both':
    return apply(p, a, b, x, labels, 'average'), apply(p, a, b, x, labels, 'velocity')
  labels, g = conditioning.split(labels)
  inputs = jnp.stack(conditioning.scalars(g, x.shape[0], x.dtype), axis=-1)
  q = {**p, 'b1': p['b1'] + inputs @ p['guidance']}
  if head == 'velocity':
    q = {**q, 'w2': p['w2v'], 'b2': p['b2v']}
  return G.apply(q, a, b, x, labels)


def inputs(seed=0):
  batch, _ = R.inputs(seed)
  return batch, init_net(jax.random.PRNGKey(seed + 10))


# --------------------------------------------------------------------------- the reference


def omega_draw(key, n, s_max, beta):
  """The reference's `sample_cfg_scale`: the inverse CDF of omega^-beta on [1, 1 + s_max]."""
  u = jax.random.uniform(key, (n,))
  if beta == 1.0:
    return jnp.exp(u * jnp.log1p(s_max))
  return jnp.exp(jnp.log1p(u * jnp.expm1((1 - beta) * jnp.log1p(s_max))) / (1 - beta))


def interval_draw(key, n):
  """The reference's t_min ~ U[0, 1/2], t_max ~ U[1/2, 1] from fmjax's numbers u1, u2 (fmjax's
  start = u1 / 2, end = 1/2 + u2 / 2): t_max = 1 - u1 / 2, t_min = 1/2 - u2 / 2."""
  k_start, k_end = jax.random.split(key)
  u1, u2 = jax.random.uniform(k_start, (n,)), jax.random.uniform(k_end, (n,))
  return 0.5 - 0.5 * u2, 1.0 - 0.5 * u1


def imf_reference(params, batch, key, o):
  p = params['net']
  n_diag = int(round(B * o.get('diagonal_fraction', 0.5)))
  n_off = B - n_diag
  s_max, beta = o.get('omega_max', 8.0) - 1.0, o.get('omega_power', 1.0)
  key_off, key_diag = R.part_keys(key)
  k_t, k_w, k_i = jax.random.split(key_off, 3)
  t_off, r_off = R.meanflow_times(k_t, n_off)
  if o.get('guidance_interval', True):
    tmin_off, tmax_off = interval_draw(k_i, n_off)
  else:
    tmin_off, tmax_off = jnp.zeros(n_off), jnp.ones(n_off)
  kd_t, kd_w = jax.random.split(key_diag)
  t_diag = R.meanflow_times(kd_t, n_diag)[0]
  t = jnp.concatenate([t_off, t_diag])
  r = jnp.concatenate([r_off, t_diag])
  omega = jnp.concatenate([omega_draw(k_w, n_off, s_max, beta), omega_draw(kd_w, n_diag, s_max, beta)])
  t_min = jnp.concatenate([tmin_off, jnp.zeros(n_diag)])
  t_max = jnp.concatenate([tmax_off, jnp.ones(n_diag)])
  e, x, y = batch['x0'], batch['x1'], batch['labels']
  z = (1 - t)[:, None] * x + t[:, None] * e
  v = e - x
  lam = o.get('velocity_head_weight', 0.0)
  # The network's inputs: MeanFlow's (r, t) and the interval in fmjax time.
  net = lambda zz, rr, tt, yy, w, lo, hi, head: apply(
      p, rr, tt, zz, conditioning.Guidance(yy, w, 1.0 - hi, 1.0 - lo), head)
  velocity = lambda yy, w: net(z, t, t, yy, w, jnp.zeros(B), jnp.ones(B),
                               'velocity' if lam else 'average')
  w = jnp.where((t >= t_min) & (t <= t_max), omega, 1.0)
  v_c = sg(velocity(y, w))
  v_u = sg(velocity(jnp.full_like(y, NULL), jnp.ones(B)))
  v_g = jnp.where((y == NULL)[:, None], v, v + (1 - 1 / w)[:, None] * (v_c - v_u))
  u = lambda zz, tt: net(zz, r, tt, y, omega, t_min, t_max, 'average')
  h = FD_STEP
  du_dt = (u(z + h * v_c, t + h) - u(z - h * v_c, t - h)) / (2 * h)
  V = u(z, t) + (t - r)[:, None] * sg(du_dt)
  adaptive = o.get('weighting', 'adaptive') == 'adaptive'
  wt = lambda a: a / sg(a + 0.01) if adaptive else a
  per_row = wt(R.sq(V - sg(v_g)))
  if lam:
    per_row = per_row + lam * wt(R.sq(net(z, r, t, y, omega, t_min, t_max, 'velocity') - sg(v_g)))
  return jnp.mean(per_row)


GUIDANCE = {'guidance_conditioning': True, 'null_label': NULL}
CASES = [
    {**GUIDANCE},                                                         # every default
    {**GUIDANCE, 'velocity_head_weight': 0.5, 'weighting': 'none', 'omega_power': 2.0, 'omega_max': 5.0,
     'guidance_interval': False, 'diagonal_fraction': 0.25},
]


def fmjax_value_and_grad(o, params, batch, key):
  rule = losses.make('imf', flow_maps.make('meanflow', apply), interpolants.get('linear'), **o)
  (value, metrics), grad = jax.value_and_grad(rule, has_aux=True)(params, batch, key)
  return value, grad, metrics


@pytest.mark.parametrize('o', CASES, ids=['-'.join(f'{k}={v}' for k, v in o.items() if k not in GUIDANCE) or 'defaults'
                                          for o in CASES])
def test_imf_with_guidance_inputs_matches_the_reference(o):
  batch, net = inputs()
  params = {'net': net}
  key = jax.random.PRNGKey(11)
  value, grad, metrics = jax.jit(lambda pp: fmjax_value_and_grad(o, pp, batch, key))(params)
  ref_value, ref_grad = jax.jit(jax.value_and_grad(lambda pp: imf_reference(pp, batch, key, o)))(params)
  assert value.dtype == jnp.float64 and float(ref_value) > 1e-2
  assert ('loss_velocity_head' in metrics) == bool(o.get('velocity_head_weight'))
  # fmjax's per-row loss is the per-dimension mean: the reference's (sum) divided by D.
  R.compare(value * D, grad, ref_value, jax.tree.map(lambda g: g / D, ref_grad), rtol=1e-6)
  if not o.get('velocity_head_weight'):   # the auxiliary head is not trained without its loss
    assert float(jnp.max(jnp.abs(grad['net']['w2v']))) == 0.0


def test_imf_defaults_are_the_reference_codes():
  settings = losses.resolve_options('imf', {})
  assert settings['diagonal_fraction'] == 0.5              # data_proportion = 0.5
  assert (settings['omega_max'], settings['omega_power']) == (8.0, 1.0)   # s_max = 7, cfg_beta = 1
  assert settings['guidance_interval'] is True
  assert settings['guidance_conditioning'] is False        # opt-in: needs labels and such a network


# ------------------------------------------------------------------------ the omega draw


@pytest.mark.parametrize('power', [1.0, 2.0, 0.5])
def test_omega_draw_has_the_power_law_density(power):
  omega_max, n = 8.0, 20_000
  draws = np.sort(np.asarray(imf_lib.draw_omega(jax.random.PRNGKey(0), n, omega_max, power)))
  assert draws.min() >= 1.0 and draws.max() <= omega_max
  # CDF of omega^-p on [1, W]: log(w) / log(W) for p = 1, (w^(1-p) - 1) / (W^(1-p) - 1) otherwise.
  cdf = (np.log(draws) / np.log(omega_max) if power == 1.0 else
         (draws**(1 - power) - 1) / (omega_max**(1 - power) - 1))
  ks = np.max(np.abs(cdf - np.arange(1, n + 1) / n))
  assert ks < 0.015, ks     # Kolmogorov-Smirnov: about 0.0096 at the 1 % level for n = 20000


def test_interval_draw_is_the_references_in_fmjax_time():
  start, end = imf_lib.draw_interval(jax.random.PRNGKey(1), 20_000)
  assert 0.0 <= float(start.min()) and float(start.max()) <= 0.5 <= float(end.min()) and float(end.max()) <= 1.0
  np.testing.assert_allclose([float(start.mean()), float(end.mean())], [0.25, 0.75], atol=0.01)


# --------------------------------------------- guidance conditioning off: nothing changes


NEW_PARAMS = {'mlp-tiny': {'guidance_embedding', 'velocity_output'},
              'unet-tiny': {'guidance_embedding', 'velocity_conv_out'},
              'DiT-tiny': {'guidance_embedding', 'velocity_adaln', 'velocity_linear'}}


def abstract_params(name, **options):
  return nnx.to_pure_dict(nnx.state(models.abstract(name, num_classes=3, **options), nnx.Param))


@pytest.mark.parametrize('name', list(NEW_PARAMS))
def test_networks_without_the_options_have_the_old_parameters(name):
  # Off (the default): the very same parameter tree, so old configs and checkpoints load.
  plain, off, on = (abstract_params(name, **o) for o in (
      {}, {'guidance_conditioning': False, 'velocity_head': False},
      {'guidance_conditioning': True, 'velocity_head': True}))
  assert jax.tree.structure(off) == jax.tree.structure(plain)
  assert set(on) - set(plain) == NEW_PARAMS[name]


# The U-Net is left out here for CI time (three U-Net compiles, 37 s); its new parameters are
# checked above. Run it with the full list when changing the U-Net's heads.
@pytest.mark.parametrize('name', [n for n in NEW_PARAMS if n != 'unet-tiny'])
def test_both_heads_come_from_one_pass(name):
  """head='both' is (head='average', head='velocity') of the same trunk, on every network, and
  the iMF rule's one-pass evaluation of both heads equals two separate evaluations through
  each flow-map parameterization (which call the network differently)."""
  with jax.enable_x64(False):
    apply, p = models.functional(models.build(name, num_classes=3, guidance_conditioning=True,
                                              velocity_head=True))
    # Jitted: op by op, the U-Net's many calls below took half a minute of CI time.
    apply = jax.jit(apply, static_argnames=('head',))
    leaves, tree = jax.tree.flatten(p)   # off the zero inits, each leaf differently
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
    p = jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape, a.dtype)
                                  for a, k in zip(leaves, keys)])
    shape = {'mlp-tiny': (3, 2), 'unet-tiny': (3, 8, 8, 3), 'DiT-tiny': (3, 8, 8, 3)}[name]
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    s, t = jnp.array([0.1, 0.2, 0.3]), jnp.array([0.5, 0.9, 0.3])
    g = conditioning.make(jnp.array([0, 1, 3]), jnp.array([1.0, 3.0, 7.5]), 3, 0.2, 0.7)
    average, velocity = apply(p, s, t, x, g, head='both')
    np.testing.assert_array_equal(average, apply(p, s, t, x, g))
    np.testing.assert_array_equal(velocity, apply(p, s, t, x, g, head='velocity'))
    assert not np.allclose(average, velocity)
    # The one-pass evaluation is network-independent: every parameterization on the MLP, one
    # on the image networks (each costs the U-Net a dozen op-by-op passes of CI time).
    for parameterization in (('displacement', 'meanflow', 'x_prediction') if name == 'mlp-tiny'
                             else ('x_prediction',)):
      fm = flow_maps.make(parameterization, apply, interpolants.linear())
      one_pass = imf_lib.both_heads(fm, 'v', p, s, t, x, g)
      separate = (fm.v(p, s, t, x, g), imf_lib.head_map(fm, "velocity").v(p, s, t, x, g))
      for a, b in zip(one_pass, separate):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    plain_apply, plain_p = models.functional(models.build(name, num_classes=3))
    with pytest.raises(ValueError, match='no velocity head'):
      plain_apply(plain_p, s, t, x, head='both')


def test_a_fresh_guidance_conditioned_network_ignores_omega_bit_for_bit():
  name = 'mlp-tiny'
  new = NEW_PARAMS[name]
  with jax.enable_x64(False):
    apply_on, p_on = models.functional(models.build(name, num_classes=3, guidance_conditioning=True,
                                                    velocity_head=True))
    graphdef_plain = nnx.split(models.abstract(name, num_classes=3))[0]
    apply_plain = lambda p, *a: nnx.merge(graphdef_plain, p)(*a)
    # On: the guidance embedding's last layer starts at zero, so with the shared parameters the
    # output is the unconditioned network's, bit for bit, at any omega and interval. (Every
    # other parameter is moved off its initial value first: the zero-initialized output layers
    # would hide a difference.)
    p_on = jax.tree.map(lambda a: a + 0.05, p_on)
    p_on['guidance_embedding']['linear1'] = jax.tree.map(jnp.zeros_like, p_on['guidance_embedding']['linear1'])
    shared = {k: v for k, v in p_on.items() if k not in new}
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 2))
    y = jnp.array([0, 1, 3])
    s, t = jnp.array([0.1, 0.2, 0.3]), jnp.array([0.5, 0.9, 0.3])
    g = conditioning.make(y, jnp.array([1.0, 3.0, 7.5]), 3, 0.2, 0.7)
    reference = apply_plain(shared, s, t, x, y)
    assert bool(jnp.array_equal(apply_on(p_on, s, t, x, g), reference))
    # A trained embedding does move the output with omega (it is not dead).
    p_on['guidance_embedding'] = jax.tree.map(lambda a: a + 0.1, p_on['guidance_embedding'])
    assert float(jnp.max(jnp.abs(apply_on(p_on, s, t, x, g) - reference))) > 1e-4


def test_imf_without_guidance_conditioning_is_the_old_rule():
  # The unguided imf is eulerian.meanflow_rule(improved=True), the rule imf was before, bit for bit.
  batch, net = inputs()
  fm, interp = flow_maps.make('meanflow', G.apply), interpolants.get('linear')
  rule = losses.make('imf', fm, interp)
  old_fn = eulerian.meanflow_rule(losses.base.Context(fm, interp, None, rule.options), improved=True)
  key = jax.random.PRNGKey(3)
  params = {'net': {k: v for k, v in net.items() if k in ('w1', 'b1', 'emb', 'w2', 'b2')}}
  new_value, new_grad = jax.jit(jax.value_and_grad(lambda pp: rule(pp, batch, key)[0]))(params)
  old_value, old_grad = jax.jit(jax.value_and_grad(lambda pp: old_fn(pp, batch, key)[0]))(params)
  assert bool(jnp.array_equal(new_value, old_value))
  assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(new_grad), jax.tree.leaves(old_grad)))


# ---------------------------------------------------------------------------- sampling


def recording_map(calls, values=None):
  """A MeanFlow map of `apply` that records each call's labels argument (at trace time) and,
  for guidance inputs, their values (omega, start, end) at run time."""
  def fake(p, a, b, x, labels=None):
    calls.append(labels)
    if values is not None and isinstance(labels, conditioning.Guidance):
      jax.debug.callback(lambda *g: values.append(np.stack(g)), labels.omega, labels.start, labels.end)
    return apply(p, a, b, x, labels)
  return flow_maps.make('meanflow', fake)


def test_sampling_feeds_the_guidance_scale_to_the_network():
  batch, net = inputs()
  x0, y = batch['x0'], batch['labels']
  calls, values = [], []
  out = samplers.flow_map_sample(recording_map(calls, values), net, x0, jnp.array([0.0, 0.5, 1.0]), y,
                                 null_label=NULL, guidance_scale=3.5, guidance_input=True,
                                 guidance_interval=(0.35, 0.6))
  # The loop body (one step) calls the network once, on the B rows: no null pass.
  assert len(calls) == 1 and isinstance(calls[0], conditioning.Guidance)
  assert calls[0].labels.shape == (B,)
  assert len(values) == 2      # two steps, each feeding omega = 3.5 on [0.35, 0.6]
  for g in values:
    np.testing.assert_allclose(g, np.stack([np.full(B, 3.5), np.full(B, 0.35), np.full(B, 0.6)]), rtol=1e-7)
  # The same as stepping the map by hand with those inputs.
  g = conditioning.make(y, 3.5, B, 0.35, 0.6)
  fm = flow_maps.make('meanflow', apply)
  by_hand = fm.X(net, 0.5, 1.0, fm.X(net, 0.0, 0.5, x0, g), g)
  np.testing.assert_allclose(out, by_hand, rtol=1e-6)
  # Without guidance_input the scale is CFG's two-pass combination with plain labels.
  calls.clear()
  samplers.flow_map_sample(recording_map(calls), {**net, 'guidance': 0 * net['guidance']}, x0,
                           jnp.array([0.0, 1.0]), y, null_label=NULL, guidance_scale=3.5)
  assert len(calls) == 1 and calls[0].shape == (2 * B,)


def test_model_sample_routes_the_scale_to_a_guidance_conditioned_network():
  from fmjax import api, sharding
  import ml_collections
  batch, net = inputs()
  net = jax.tree.map(lambda a: a.astype(jnp.float32), net)   # Model samples float32 noise
  calls, values = [], []
  config = ml_collections.ConfigDict({'model': {'guidance_conditioning': True}})
  model = api.Model(config, net, recording_map(calls, values), (D,), G.C, 0, sharding.local_mesh())
  labels = np.array(batch['labels'][:4])
  with jax.enable_x64(False):
    x = model.sample(jax.random.PRNGKey(0), 4, steps=1, labels=labels, guidance_scale=2.0,
                     guidance_interval=(0.2, 0.8))
  assert x.shape == (4, D) and len(calls) == 1 and isinstance(calls[0], conditioning.Guidance)
  np.testing.assert_allclose(values[0], np.stack([np.full(4, 2.0), np.full(4, 0.2), np.full(4, 0.8)]), rtol=1e-7)
  plain = api.Model(ml_collections.ConfigDict({'model': {}}), net, recording_map([]), (D,), G.C, 0,
                    sharding.local_mesh())
  with pytest.raises(ValueError, match='guidance_interval is an input of guidance-conditioned'):
    plain.sample(jax.random.PRNGKey(0), 4, labels=labels, guidance_interval=(0.2, 0.8))
  with pytest.raises(ValueError, match='guidance_scale must be > 0'):
    model.sample(jax.random.PRNGKey(0), 4, labels=labels, guidance_scale=0.0)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize('options,message', [
    ({'guidance_conditioning': True}, 'needs null_label'),
    ({**GUIDANCE, 'omega': 2.0}, 'leave the fixed omega = 1'),
    ({**GUIDANCE, 'omega_max': 0.5}, 'omega_max must be >= 1'),
    ({'velocity_head_weight': 1.0}, 'with guidance_conditioning=True only'),
])
def test_bad_imf_options_raise_one_clear_error(options, message):
  with pytest.raises(ValueError, match=message):
    losses.resolve_options('imf', options)


def test_config_needs_the_network_options_the_rule_uses():
  c = configs.base_config()
  c.data.name, c.data.num_classes = 'gmm', 3
  c.loss.name = 'imf'
  c.loss.guidance_conditioning = True
  with pytest.raises(configs.ConfigError, match='model.guidance_conditioning=True'):
    configs.resolve(c)
  c.model.guidance_conditioning = True
  c.loss.velocity_head_weight = 1.0
  with pytest.raises(configs.ConfigError, match='model.velocity_head=True'):
    configs.resolve(c)
  c.model.velocity_head = True
  assert configs.resolve(c).loss.omega_max == 8.0
