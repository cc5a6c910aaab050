"""MeanFlow, iMF and shortcut models written plainly in their papers' notation, against fmjax.

Each reference below is the paper's algorithm in the paper's own notation and time direction,
written from the paper and its reference code, never calling fmjax.losses:

- MeanFlow (Geng et al., arXiv 2505.13447, Eqs. 6-10, 13; reference code Gsunshine/meanflow,
  meanflow.py): z_t = (1 - t) x + t e (t = 1 noise), v = e - x, average velocity u(z, r, t),
  u_tgt = v~ - (t - r) du/dt with du/dt = v~ . d_z u + d_t u, loss ||u - sg(u_tgt)||^2 with
  ||.||^2 the SUM over dimensions, adaptive weight 1 / sg(||.||^2 + c)^p (p = 1, c = 0.01 in
  the reference code's configs/default.py). Times: t, r two logit-normal(-0.4, 1) draws,
  t = max, r = min, and r = t on a fraction 0.75 of the rows (`sample_tr`).
- iMF ("Improved Mean Flows", Eq. 13 as written in fmjax's docstring, paper not re-checked
  here): V = u + (t - r) sg[du/dt along (u(z, t, t), 0, 1)] regresses onto v~.
- Shortcut models (Frans et al., arXiv 2410.12557, Eq. 5; reference code
  kvfrans/shortcut-models, targets_shortcut.py): x_t = (1 - t) x0 + t x1 (t = 1 data),
  self-consistency rows |s(x_t, t, 2d) - sg[(s(x_t, t, d) + s(x'_{t+d}, t + d, d)) / 2]|^2 with
  x'_{t+d} = x_t + d s(x_t, t, d) on dyadic 2d = 2^-k from grid times, flow-matching rows
  |s(x_t, t, 1/128) - (x1 - x0)|^2 at grid times j / 128.

The derivatives du/dt are central finite differences in float64 (not jvps); the references'
gradients are jax.grad through the finite-difference expressions, with the stop-gradients
where the papers put them. The references draw their own times from the same random numbers
as fmjax (the keys of base.two_part_rule), so a changed time distribution fails.

Deliberate differences from the reference code, which these tests pin: fmjax's per-row loss
is the per-dimension MEAN (the reference's sum / D, the adaptive weight reads the sum), the
diagonal rows are the last rows of a batch (the reference's first), fmjax's linear interpolant
has no 1 - 1e-5 factor on the noise (shortcut's reference does), shortcut's jump levels are
drawn at random per row (the reference splits the bootstrap rows evenly over levels) and its
targets are not clipped to [-4, 4].
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import flow_maps, interpolants, losses

import test_rule_gradients as G

sg = jax.lax.stop_gradient
B, D, C, NULL = G.B, G.D, G.C, G.NULL
LABELS = [0, 1, NULL, 2, 1, NULL, 0, 2]
FD_STEP = 1e-5
EPS = 1e-5                        # fmjax clips its times to [EPS, 1 - EPS]


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


# The tiny float64 network of the gradient tests: net(a, b, x | c) is MeanFlow's u(z, r=a, t=b)
# and shortcut's s(x, t=a, t+d=b).
init_net, apply = G.init_net, G.apply


def inputs(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  data = jnp.asarray([1.0, -2.0, 0.5]) + jnp.asarray([0.5, 2.0, 1.0]) * jax.random.normal(k[1], (B, D))
  return {'x0': jax.random.normal(k[0], (B, D)), 'x1': data, 'labels': jnp.array(LABELS)}, init_net(k[2])


def part_keys(key):
  """The keys of the off-diagonal and diagonal rows' times (base.draw_rows splits the key three
  ways, base.two_part_rule the third in two)."""
  return jax.random.split(jax.random.split(key, 3)[2])


def sq(err):
  return jnp.sum(err**2, axis=-1)     # the papers' ||.||^2: a sum over dimensions


# ------------------------------------------------------------------------------- MeanFlow


def meanflow_times(key, n, mean=-0.4, std=1.0):
  """MeanFlow's sample_tr in its own time (1 = noise): two logit-normal(mean, std) draws, t the
  larger, r the smaller. fmjax draws sigmoid(-mean + std n) in its reversed time from the same
  normals n; 1 - sigmoid(-mean + std n) = sigmoid(mean - std n), so the paper's draw from these
  numbers uses -n (the same distribution)."""
  normals = jax.random.normal(key, (2 * n,))
  draws = jnp.clip(jax.nn.sigmoid(mean - std * normals), EPS, 1 - EPS)
  a, b = jnp.split(draws, 2)
  return jnp.maximum(a, b), jnp.minimum(a, b)


def guided_v(p, z, t, v, y, omega, kappa):
  """v~ (MeanFlow Eq. 13, App. B.1; reference `guidance_fn` and `cond_drop`): omega v + kappa
  u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | null) on labelled rows, v on null rows."""
  if (omega, kappa) == (1.0, 0.0):
    return v
  u_c = sg(apply(p, t, t, z, y))
  u_n = sg(apply(p, t, t, z, jnp.full_like(y, NULL)))
  guided = omega * v + kappa * u_c + (1 - omega - kappa) * u_n
  return jnp.where((y == NULL)[:, None], v, guided)


def meanflow_reference(params, batch, key, o, improved=False):
  """The paper's loss (sum over dimensions, mean over rows) on fmjax's batch and keys."""
  p = params['net']
  # data_proportion: 0.75 in MeanFlow's reference code, 0.5 in iMF's (Lyy-iiis/imeanflow).
  n_diag = int(round(B * o.get('diagonal_fraction', 0.5 if improved else 0.75)))
  n_off = B - n_diag
  key_off, key_diag = part_keys(key)
  t_off, r_off = meanflow_times(key_off, n_off)
  t_diag, _ = meanflow_times(key_diag, n_diag)     # r = t on these rows: t from the same sort
  t = jnp.concatenate([t_off, t_diag])
  r = jnp.concatenate([r_off, t_diag])
  e, x, y = batch['x0'], batch['x1'], batch['labels']
  z = (1 - t)[:, None] * x + t[:, None] * e
  v_g = guided_v(p, z, t, e - x, y, o.get('omega', 1.0), o.get('kappa', 0.0))
  u = lambda zz, tt: apply(p, r, tt, zz, y)
  h = FD_STEP
  if not improved:
    # du/dt along (dz, dr, dt) = (v~, 0, 1) by a central difference.
    du_dt = (u(z + h * v_g, t + h) - u(z - h * v_g, t - h)) / (2 * h)
    per_row = sq(u(z, t) - sg(v_g - (t - r)[:, None] * du_dt))
  else:
    own = sg(apply(p, t, t, z, y))
    du_dt = (u(z + h * own, t + h) - u(z - h * own, t - h)) / (2 * h)
    per_row = sq(u(z, t) + (t - r)[:, None] * sg(du_dt) - v_g)
  if o.get('weighting', 'adaptive') == 'adaptive':
    per_row = per_row / sg(per_row + o.get('adaptive_eps', 0.01))
  return jnp.mean(per_row)


def fmjax_loss(name, o, params, batch, key, parameterization):
  flow_map = flow_maps.make(parameterization, apply)
  rule = losses.make(name, flow_map, interpolants.get('linear'), **o)
  return rule(params, batch, key)[0], rule


def compare(value, grad, ref_value, ref_grad, rtol):
  np.testing.assert_allclose(value, ref_value, rtol=rtol)
  flat, ref_flat = (jax.flatten_util.ravel_pytree(g)[0] for g in (grad, ref_grad))
  scale = float(jnp.max(jnp.abs(ref_flat)))
  assert scale > 1e-3
  np.testing.assert_allclose(flat, ref_flat, rtol=rtol, atol=rtol * scale)


GUIDED = {'omega': 0.6, 'kappa': 0.3, 'null_label': NULL}
MEANFLOW_CASES = [
    ('meanflow', {}),                                                   # every default
    ('meanflow', {**GUIDED}),
    ('meanflow', {'omega': 2.0, 'null_label': NULL}),                   # kappa = 0
    ('meanflow', {**GUIDED, 'weighting': 'none', 'diagonal_fraction': 0.5}),
    ('meanflow', {'adaptive_eps': 1e-3, 'diagonal_fraction': 0.25}),
    ('imf', {}),
    ('imf', {**GUIDED, 'weighting': 'none', 'diagonal_fraction': 0.5}),
]


@pytest.mark.parametrize('name,o', MEANFLOW_CASES,
                         ids=[f'{n}-' + '-'.join(f'{k}={v}' for k, v in o.items()) for n, o in MEANFLOW_CASES])
def test_meanflow_matches_the_paper_with_finite_differences(name, o):
  batch, net = inputs()
  params = {'net': net}
  key = jax.random.PRNGKey(7)
  (value, grad) = jax.value_and_grad(
      lambda pp: fmjax_loss(name, o, pp, batch, key, 'meanflow')[0])(params)
  ref_value, ref_grad = jax.value_and_grad(
      lambda pp: meanflow_reference(pp, batch, key, o, improved=name == 'imf'))(params)
  assert value.dtype == jnp.float64 and float(ref_value) > 1e-2
  # fmjax's per-row loss is the per-dimension mean: the paper's (sum) divided by D.
  compare(value * D, grad, ref_value, jax.tree.map(lambda g: g / D, ref_grad), rtol=1e-6)


def test_meanflow_defaults_are_the_reference_codes():
  settings = losses.resolve_options('meanflow', {})
  assert settings['times'] == {'name': 'logit_normal', 'mean': 0.4, 'std': 1.0, 'eps': EPS}
  assert settings['diagonal_fraction'] == 0.75 and settings['diagonal_time'] == 'pair'
  assert (settings['weighting'], settings['adaptive_power'], settings['adaptive_eps']) == ('adaptive', 1.0, 0.01)
  imf = losses.resolve_options('imf', {})
  assert imf['diagonal_time'] == 'pair' and imf['diagonal_fraction'] == 0.5


def test_meanflow_without_kappa_runs_no_conditional_pass():
  # With kappa = 0 the guided target needs only u(z, t, t | null): count the network's calls.
  batch, net = inputs()
  calls = []
  def counting(p, a, b, x, labels=None):
    calls.append(None if labels is None else labels.shape[0])
    return apply(p, a, b, x, labels)
  for kappa, expected in ((0.0, 1), (0.3, 2)):
    calls.clear()
    rule = losses.make('meanflow', flow_maps.make('meanflow', counting), interpolants.get('linear'),
                       omega=2.0, kappa=kappa, null_label=NULL, diagonal_fraction=0.5)
    jax.make_jaxpr(lambda pp: rule(pp, batch, jax.random.PRNGKey(0))[0])({'net': net})
    # Off-diagonal: the guidance pass (B/2 rows, or B for both branches at once) + the jvp.
    assert calls[0] == expected * (B // 2), calls


# ------------------------------------------------------------------------------- shortcut


def shortcut_reference(params, batch, key, o, levels=7):
  """Shortcut models' loss (sum over dimensions, mean over rows) on fmjax's batch and keys."""
  p = params['net']
  s_fn = lambda x, t, d, y: apply(p, t, t + d, x, y)   # s_theta(x_t, t, d)
  n_diag = int(round(B * o.get('diagonal_fraction', 0.875)))
  n_off = B - n_diag
  key_off, key_diag = part_keys(key)
  x0, x1, y = batch['x0'], batch['x1'], batch['labels']
  per_row = []
  if n_off:
    # 2d = 2^-k, k uniform in {0, ..., levels - 1}; t = j 2d on the grid with t + 2d <= 1.
    key_level, key_start = jax.random.split(jax.random.split(key_off)[0])
    k = jax.random.randint(key_level, (n_off,), 0, levels)
    two_d = 0.5 ** k
    t = jnp.floor(jax.random.uniform(key_start, (n_off,)) * 2.0**k) * two_d
    d = two_d / 2
    a0, a1, ay = x0[:n_off], x1[:n_off], y[:n_off]
    xt = (1 - t)[:, None] * a0 + t[:, None] * a1
    first = s_fn(xt, t, d, ay)
    second = s_fn(xt + d[:, None] * first, t + d, d, ay)
    per_row.append(sq(s_fn(xt, t, two_d, ay) - sg((first + second) / 2)))
  if n_diag:
    # Flow matching at the finest step 1 / 2^levels from grid times (reference: dt_base =
    # log2(denoise_timesteps), t = randint(0, denoise_timesteps) / denoise_timesteps).
    cells = 2**levels
    t = jax.random.randint(key_diag, (n_diag,), 0, cells) / cells
    b0, b1, by = x0[n_off:], x1[n_off:], y[n_off:]
    xt = (1 - t)[:, None] * b0 + t[:, None] * b1
    per_row.append(sq(s_fn(xt, t, 1 / cells, by) - (b1 - b0)))
  per_row = jnp.concatenate(per_row)
  if o.get('weighting', 'none') == 'adaptive':
    per_row = per_row / sg(per_row + o.get('adaptive_eps', 1e-3))
  return jnp.mean(per_row)


SHORTCUT_CASES = [{}, {'diagonal_fraction': 0.5}, {'diagonal_fraction': 0.5, 'weighting': 'adaptive'}]


@pytest.mark.parametrize('o', SHORTCUT_CASES, ids=[str(o) for o in SHORTCUT_CASES])
def test_shortcut_matches_the_paper(o):
  batch, net = inputs(1)
  params = {'net': net}
  key = jax.random.PRNGKey(3)
  value, grad = jax.value_and_grad(lambda pp: fmjax_loss('shortcut', o, pp, batch, key, 'displacement')[0])(params)
  ref_value, ref_grad = jax.value_and_grad(lambda pp: shortcut_reference(pp, batch, key, o))(params)
  assert value.dtype == jnp.float64 and float(ref_value) > 1e-2
  compare(value * D, grad, ref_value, jax.tree.map(lambda g: g / D, ref_grad), rtol=1e-9)


def test_shortcut_defaults_are_the_reference_codes():
  # bootstrap_every = 8: one row in eight is a self-consistency row, 7/8 flow matching.
  settings = losses.resolve_options('shortcut', {})
  assert settings['diagonal_fraction'] == 0.875 and settings['dyadic_levels'] == 7
  assert settings['finest_step_flow_matching'] is True
