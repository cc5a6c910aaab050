"""Every rule's value AND gradient against an independent float64 reference of its paper formula.

The exact-map tests (test_rules.py) pin each rule's value; they cannot see where its gradient
flows (a stop-gradient removed or misplaced leaves every value unchanged). Here each rule of
`fmjax.losses.RULES` is differentiated with respect to the parameters of a tiny tanh MLP and
compared with a reference written plainly from the paper, in the paper's own notation where it
differs from fmjax's (MeanFlow's u(z, r, t) with t = 1 noise, shortcut models' step d). The
references never call fmjax.losses code except the public time samplers, which they call with
the keys a rule uses (`rule_keys`) so that both see the same times; the values must then agree
to rounding before the gradients are compared.
"""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import flow_maps, interpolants, losses
from fmjax.losses import eulerian
from fmjax.losses import times as times_lib

sg = jax.lax.stop_gradient
B, D, H, C = 8, 3, 16, 3          # batch, data dimension, hidden width, classes
NULL = C                          # the "no label" class of classifier-free guidance
LABELS = [0, 1, NULL, 2, 1, NULL, 0, 2]
UNIFORM = times_lib.TimeDistribution()
MEANFLOW_TIMES = {'name': 'logit_normal', 'mean': 0.4, 'std': 1.0}
# fmjax.samplers.integrate builds its time grid in float32, so the rules that solve the teacher
# ODE (progressive, fmm) agree with the float64 reference only to float32 time rounding.
FLOAT32_TIMES = ('progressive', 'trajectory_distillation', 'fmm')


@pytest.fixture(autouse=True)
def _float64():
  with jax.enable_x64(True):
    yield


# ------------------------------------------------------------------ network and teacher


def init_net(key):
  k = jax.random.split(key, 5)
  return {'w1': jax.random.normal(k[0], (D + 2, H)) / np.sqrt(D + 2),
          'b1': 0.3 * jax.random.normal(k[1], (H,)),
          'emb': 0.5 * jax.random.normal(k[2], (C + 1, H)),
          'w2': jax.random.normal(k[3], (H, D)) / np.sqrt(H),
          'b2': 0.3 * jax.random.normal(k[4], (D,))}


def apply(p, s, t, x, labels=None):
  """A 2-layer tanh MLP of (s, t, x) plus a label embedding: net(s, t, x | c)."""
  s, t = jnp.broadcast_to(s, x.shape[:1]), jnp.broadcast_to(t, x.shape[:1])
  h = jnp.concatenate([x, s[:, None], t[:, None]], axis=-1) @ p['w1'] + p['b1']
  if labels is not None:
    h = h + p['emb'][labels]
  return jnp.tanh(h) @ p['w2'] + p['b2']


M, SD = [1.0, -2.0, 0.5], [0.5, 2.0, 1.0]


def gaussian_velocity(interp, t, x):
  """The exact velocity of N(M, diag(SD^2)) under the interpolant (toy.GaussianTarget in float64):
  b_t(x) = mu'_t + (std'_t / std_t)(x - mu_t), mu_t = beta_t M, std_t^2 = alpha_t^2 + beta_t^2 SD^2."""
  M_, SD_ = jnp.asarray(M), jnp.asarray(SD)
  t = t[:, None]
  a, b, ad, bd = interp.alpha(t), interp.beta(t), interp.alpha_dot(t), interp.beta_dot(t)
  std = jnp.sqrt(a**2 + (b * SD_)**2)
  dstd = (a * ad + b * bd * SD_**2) / std
  return bd * M_ + dstd / std * (x - b * M_)


# --------------------------------------------------------------------- reference maps
# The displacement map of Boffi et al. (2406.07507, Sec. 2), written out: X = x + (t - s) v.


def X(p, s, t, x, y):
  return x + (t - s)[:, None] * apply(p, s, t, x, y)


def b(p, t, x, y):
  return apply(p, t, t, x, y)


def msq(err):
  return jnp.mean(err**2, axis=-1)


def rule_keys(key):
  """The keys a rule draws its times from: base.draw_rows splits the key three ways (noise,
  label dropout, rest) and base.two_part_rule splits the rest into off-diagonal and diagonal."""
  return jax.random.split(jax.random.split(key, 3)[2])


# ------------------------------------------------------- references of the off-diagonal terms
# Each returns (per-row distance, s, t) for the off-diagonal rows x0, x1, y.


def ref_lsd(p, x0, x1, y, key, step, o, use_teacher):
  """LSD / LMD (Boffi et al. 2505.18825 Sec. 3; 2406.07507 Sec. 3): |d/dt X_{s,t} - sg[b_t(X_{s,t})]|^2."""
  s, t = times_lib.sample_pairs(key, x0.shape[0], UNIFORM)
  xs = o['interp'].sample(s, x0, x1)
  Xst, dX_dt = jax.jvp(lambda tt: X(p, s, tt, xs, y), (t,), (jnp.ones_like(t),))
  target = sg(o['teacher_fn'](t, Xst, y) if use_teacher else b(p, t, Xst, y))
  if o.get('grad_through_jvp', True):
    return msq(dX_dt - target), s, t
  # MeanFlow-style placement: v regresses onto sg[b_t(X) - (t - s) dv/dt].
  v, dv_dt = jax.jvp(lambda tt: apply(p, s, tt, xs, y), (t,), (jnp.ones_like(t),))
  return msq(v - sg(target - (t - s)[:, None] * dv_dt)), s, t


def ref_esd(p, x0, x1, y, key, step, o, use_teacher):
  """ESD / EMD (Boffi et al. 2505.18825 Sec. 3; 2406.07507 Sec. 3): d/ds X_{s,t} + grad X_{s,t} w,
  w = sg[v_{s,s}(I_s)] or the teacher b_s(I_s)."""
  s, t = times_lib.sample_pairs(key, x0.shape[0], UNIFORM)
  xs = o['interp'].sample(s, x0, x1)
  w = sg(o['teacher_fn'](s, xs, y) if use_teacher else b(p, s, xs, y))
  ones = jnp.ones_like(s)
  gradient = o['eulerian_gradient']
  if gradient == 'derivative':
    dX_ds = jax.jvp(lambda ss: X(p, ss, t, xs, y), (s,), (ones,))[1]
    transport = jax.jvp(lambda xx: X(p, s, t, xx, y), (xs,), (w,))[1]
    return msq(dX_ds + sg(transport)), s, t
  if gradient == 'residual':
    return msq(jax.jvp(lambda ss, xx: X(p, ss, t, xx, y), (s, xs), (ones, w))[1]), s, t
  v, Dv = jax.jvp(lambda ss, xx: apply(p, ss, t, xx, y), (s, xs), (ones, w))
  return msq(v - sg(w + (t - s)[:, None] * Dv)), s, t


def ref_psd(p, x0, x1, y, key, step, o, use_teacher):
  """PSD (Boffi et al. 2505.18825 Sec. 3): |X_{s,t}(I_s) - sg[X_{u,t}(X_{s,u}(I_s))]|^2, u ~ U[s, t];
  in v-space the same residual divided by t - s; progressive distillation (2406.07507 Sec. 3.3)
  takes each inner jump by `teacher_steps` Heun steps of the teacher (8 unless set: the default)."""
  key_pair, key_u = jax.random.split(key)
  s, t = times_lib.sample_pairs(key_pair, x0.shape[0], UNIFORM)
  # PSD's default intermediate time is uniform, progressive distillation's the midpoint.
  midpoint = o.get('intermediate', 'midpoint' if use_teacher else 'uniform') == 'midpoint'
  u = s + (0.5 if midpoint else jax.random.uniform(key_u, s.shape)) * (t - s)
  xs = o['interp'].sample(s, x0, x1)
  if use_teacher:
    jump = lambda a, c, x: heun_steps(o['teacher_fn'], a, c, x, y, o.get('teacher_steps', 8))
  else:
    jump = lambda a, c, x: X(p, a, c, x, y)
  two_jumps = sg(jump(u, t, jump(s, u, xs)))
  if o.get('space', 'x') == 'x':
    return msq(X(p, s, t, xs, y) - two_jumps), s, t
  return msq(apply(p, s, t, xs, y) - (two_jumps - xs) / (t - s)[:, None]), s, t


def heun(teacher, s, t, x, y):
  h = (t - s)[:, None]
  k1 = teacher(s, x, y)
  k2 = teacher(t, x + h * k1, y)
  return x + 0.5 * h * (k1 + k2)


def rk4(teacher, s, t, x, y):
  h = (t - s)[:, None]
  k1 = teacher(s, x, y)
  k2 = teacher(s + (t - s) / 2, x + h / 2 * k1, y)
  k3 = teacher(s + (t - s) / 2, x + h / 2 * k2, y)
  k4 = teacher(t, x + h * k3, y)
  return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def ode_steps(teacher, s, t, x, y, n, method):
  """n steps of Heun or RK4 on fmjax's float32 uniform grid (see heun_steps)."""
  s32, t32 = s.astype(jnp.float32), t.astype(jnp.float32)
  grid = [s32 + (jnp.float32(k) / jnp.float32(n)) * (t32 - s32) for k in range(n)] + [t32]
  step = {'heun': heun, 'rk4': rk4}[method]
  for a, c in zip(grid[:-1], grid[1:]):
    x = step(teacher, a.astype(s.dtype), c.astype(s.dtype), x, y)
  return x


def heun_steps(teacher, s, t, x, y, n):
  """n Heun steps on the uniform grid from s to t, the grid rounded to float32 as
  fmjax.samplers.integrate builds it (the rounding alone moves the loss by ~1e-5 at n = 8)."""
  s32, t32 = s.astype(jnp.float32), t.astype(jnp.float32)
  grid = [s32 + (jnp.float32(k) / jnp.float32(n)) * (t32 - s32) for k in range(n)] + [t32]
  for a, c in zip(grid[:-1], grid[1:]):
    x = heun(teacher, a.astype(s.dtype), c.astype(s.dtype), x, y)
  return x


def ref_shortcut(p, x0, x1, y, key, step, o, use_teacher):
  """Shortcut models (Frans et al. 2410.12557, Eq. 5) with fmjax's s_theta(x_t, t, d) = v_{t,t+d}:
  |s(x_t, t, 2d) - sg[(s(x_t, t, d) + s(x'_{t+d}, t + d, d)) / 2]|^2, x'_{t+d} = x_t + d s(x_t, t, d),
  on dyadic steps 2d = 2^-k from grid points."""
  key_pair, _ = jax.random.split(key)
  s, t = times_lib.sample_dyadic_steps(key_pair, x0.shape[0], 7)
  d = 0.5 * (t - s)
  shortcut = lambda x, tt, dd, yy: apply(p, tt, tt + dd, x, yy)
  xs = o['interp'].sample(s, x0, x1)
  first = shortcut(xs, s, d, y)
  second = shortcut(xs + d[:, None] * first, s + d, d, y)
  return msq(shortcut(xs, s, 2 * d, y) - sg((first + second) / 2)), s, t


def mf_velocity_target(p, s, z, x0, x1, y, o, use_teacher):
  """MeanFlow's (guided) velocity v~ on its own time t_MF = 1 - s (Geng et al. 2505.13447, Eq. 13,
  App. B.1): omega v + kappa u(z, t, t | c) + (1 - omega - kappa) u(z, t, t | null) on labelled
  rows, v on null rows, with v = e - x (dz/dt_MF = -dI/ds) or the teacher's."""
  v = -sg(o['teacher_fn'](s, z, y)) if use_teacher else -o['interp'].time_derivative(s, x0, x1)
  omega, kappa = o.get('omega', 1.0), o.get('kappa', 0.0)
  if y is None or (omega, kappa) == (1.0, 0.0):
    return v
  t_mf = 1.0 - s
  u = lambda labels: sg(apply(p, t_mf, t_mf, z, labels))   # MeanFlowMap: apply(r, t) = u(z, r, t)
  guided = omega * v + kappa * u(y) + (1 - omega - kappa) * u(jnp.full_like(y, NULL))
  return jnp.where((y == NULL)[:, None], v, guided)


def ref_meanflow(p, x0, x1, y, key, step, o, use_teacher, improved=False):
  """MeanFlow (Geng et al. 2505.13447, Eqs. 6-10) in its own convention (t = 1 noise):
  u_tgt = v~ - (t - r)(v~ d_z u + d_t u), loss |u(z_t, r, t) - sg(u_tgt)|^2. iMF ("Improved Mean
  Flows", Eq. 13): V = u + (t - r) sg[JVP(u; (u(z, t, t), 0, 1))] regresses onto v~."""
  s, t = times_lib.sample_pairs(key, x0.shape[0], times_lib.TimeDistribution(**MEANFLOW_TIMES))
  t_mf, r_mf = 1.0 - s, 1.0 - t
  z = o['interp'].sample(s, x0, x1)
  v = mf_velocity_target(p, s, z, x0, x1, y, o, use_teacher)
  u_fn = lambda zz, rr, tt: apply(p, rr, tt, zz, y)
  zeros, ones = jnp.zeros_like(s), jnp.ones_like(s)
  if not improved:
    u, du_dt = jax.jvp(u_fn, (z, r_mf, t_mf), (v, zeros, ones))
    return msq(u - sg(v - (t_mf - r_mf)[:, None] * du_dt)), s, t
  own = sg(apply(p, t_mf, t_mf, z, y))
  u, du_dt = jax.jvp(u_fn, (z, r_mf, t_mf), (own, zeros, ones))
  return msq(u + (t_mf - r_mf)[:, None] * sg(du_dt) - v), s, t


def ref_sct(p, x0, x1, y, key, step, o, use_teacher):
  """sCT / sCD with tangent_form='displacement' (fmjax's simplification of Lu & Song 2410.11081,
  Alg. 1; the paper's TrigFlow form is tests/test_reference_consistency.py) on
  f(x, s) = X_{s,1}(x) = x + (1 - s) F: g = F - w - r (1 - s) dF/ds along (1, w),
  r = min(1, step / warmup), g <- g / (|g| + c), loss |F - sg(F) + sg(g)|^2 (value |g|^2,
  gradient 2 g . dF); times from the rule's `times` (uniform)."""
  assert o['tangent_form'] == 'displacement' and o['time_sampling'] == 'times'
  s = UNIFORM.sample(key, x0.shape[0])
  one = jnp.ones_like(s)
  xs = o['interp'].sample(s, x0, x1)
  w = sg(o['teacher_fn'](s, xs, y)) if use_teacher else o['interp'].time_derivative(s, x0, x1)
  F, dF = jax.jvp(lambda ss, xx: apply(p, ss, one, xx, y), (s, xs), (one, w))
  warmup = o['warmup_steps']
  ramp = min(1.0, step / warmup) if warmup else 1.0
  g = F - w - ramp * (1 - s)[:, None] * dF
  c = o.get('tangent_normalization', 0.1)
  if c > 0:
    g = g / (jnp.sqrt(msq(g))[:, None] + c)
  return msq(F - sg(F) + sg(g)), s, one


def ref_ect(p, x0, x1, y, key, step, o, use_teacher):
  """ECT (Geng et al. 2406.14548; locuslab/ect training/loss.py): d(f(I_s, s), sg[f(I_s', s')]) w.
  gap_schedule 'ect' (default), in EDM noise level: t = sigma(s) = alpha(s) / beta(s),
  r = max(0, t (1 - q^-(k+1) (1 + 8 sigmoid(-t)))), k = floor(step / d), s' = sigma^-1(r) in
  closed form (linear: 1 / (1 + r); trigonometric: (2 / pi) atan(1 / r)), w = 1 / (t - r).
  'linear_time': s' = s + gap, gap = (1 - s) / q^k (at least min(min_gap, 1 - s)), w = 1 / gap.
  d pseudo-Huber (iCT Eq. 8, not checked; c = 0 by default, ECT's L2 distance); times: ECT's
  log-normal sigma (locuslab/ect training/loss.py:54-55) mapped to s in closed form, or uniform
  (time_sampling='times'); with a teacher, I_s' is one Euler step of it from (s, I_s)."""
  linear = o['interp'].name == 'linear'
  if o.get('time_sampling', 'log_normal_sigma') == 'times':
    s = UNIFORM.sample(key, x0.shape[0])
  else:
    sigma = jnp.exp(o.get('sigma_mean', -1.1) + o.get('sigma_std', 2.0) * jax.random.normal(key, x0.shape[:1]))
    s = 1 / (1 + sigma) if linear else 2 / np.pi * jnp.arctan2(1.0, sigma)
  one = jnp.ones_like(s)
  q, halving, min_gap = o.get('gap_decay', 2.0), o.get('gap_halving_steps', 25_000), o.get('min_gap', 1e-3)
  k = step // halving
  if o.get('gap_schedule', 'ect') == 'ect':
    t = (1 - s) / s if linear else 1 / jnp.tan(np.pi * s / 2)
    r = jnp.maximum(0.0, t * (1 - (1 + 8 / (1 + jnp.exp(t))) / q ** (k + 1)))
    if linear:
      s_next = 1 / (1 + r)
    else:
      s_next = 2 / np.pi * jnp.arctan2(1.0, r)
    w = 1 / (t - r)
  else:
    gap = jnp.maximum((1 - s) / q ** k, jnp.minimum(min_gap, 1 - s))
    s_next, w = s + gap, 1 / gap
  xs = o['interp'].sample(s, x0, x1)
  if use_teacher:
    x_next = xs + (s_next - s)[:, None] * o['teacher_fn'](s, xs, y)
  else:
    x_next = o['interp'].sample(s_next, x0, x1)
  err = X(p, s, one, xs, y) - sg(X(p, s_next, one, x_next, y))
  c = o.get('huber_c', 0.0)
  return (jnp.sqrt(msq(err) + c**2) - c) * w, s, one


def ref_fmm(p, x0, x1, y, key, step, o, use_teacher):
  """Trajectory distillation (Luhman & Luhman 2021, for every pair (s, t)):
  |X_{s,t}(I_s) - sg[Phi_{s,t}(I_s)]|^2, Phi: `ode_steps` Heun or RK4 steps of the teacher."""
  s, t = times_lib.sample_pairs(key, x0.shape[0], UNIFORM)
  xs = o['interp'].sample(s, x0, x1)
  x = ode_steps(o['teacher_fn'], s, t, xs, y, o['ode_steps'], o.get('ode_method', 'heun'))
  return msq(X(p, s, t, xs, y) - sg(x)), s, t


OFF_DIAGONAL = {'lsd': ref_lsd, 'lmd': ref_lsd, 'esd': ref_esd, 'emd': ref_esd, 'psd': ref_psd,
                'progressive': ref_psd, 'shortcut': ref_shortcut, 'meanflow': ref_meanflow,
                'imf': functools.partial(ref_meanflow, improved=True), 'sct': ref_sct, 'ect': ref_ect, 'trajectory_distillation': ref_fmm,
                'fmm': ref_fmm}


def weigh(per_row, p, s, t, o):
  """MeanFlow's adaptive weight sg[1 / (|err|^2 + c)^p] |err|^2 (Geng et al. 2025, Sec. 4.3), or
  EDM2's learned log-variance |err|^2 / e^u + u (Karras et al. 2024, Eq. 14), u(s, t) a linear
  readout of fixed random Fourier features of (s, t)."""
  mode = o.get('weighting', 'none')
  if mode == 'adaptive':
    # |err|^2 the sum over the D dimensions (reference code: jnp.sum over pixels), c = 1e-3
    # (CommonOptions) or 0.01 (MeanFlow's reference code, the meanflow/imf default).
    return per_row / sg(D * per_row + o['adaptive_eps'])
  if mode == 'learned':
    lv = p['log_variance']
    features = jnp.cos(2 * np.pi * (jnp.stack([s, t], -1) @ sg(lv['frequencies']) + sg(lv['phases'])))
    u = features @ lv['w'] / np.sqrt(lv['w'].shape[0]) + lv['b']
    return per_row * jnp.exp(-u) + u
  return per_row


def reference_loss(name, o, params, batch, key):
  """The mean over rows of the weighted off-diagonal rows (first) and diagonal rows (last)."""
  use_teacher = name in ('lmd', 'emd', 'progressive', 'trajectory_distillation', 'fmm') or o.get('teacher', False)
  # MeanFlow's reference code uses c = 0.01 (Gsunshine/meanflow, configs/default.py norm_eps).
  o = {'adaptive_eps': 0.01 if name in ('meanflow', 'imf') else 1e-3, **o}
  net = params['net']
  n_diag = int(round(B * o['diagonal_fraction']))
  n_off = B - n_diag
  key_off, key_diag = rule_keys(key)
  x0, x1, y = batch['x0'], batch['x1'], batch.get('labels')
  cut = lambda a, sl: None if a is None else a[sl]
  per_row = []
  if n_off:
    rows = [cut(a, slice(None, n_off)) for a in (x0, x1, y)]
    dist, s, t = OFF_DIAGONAL[name](net, *rows, key_off, int(batch.get('step', 0)), o, use_teacher)
    per_row.append(weigh(dist, params, s, t, o))
  if n_diag:
    # Flow matching on the diagonal (Lipman et al. 2023, Eq. 23): |b_t(I_t) - dI/dt|^2, the
    # teacher's velocity when distilling, MeanFlow's guided v~ for MeanFlow with guidance.
    d0, d1, dy = (cut(a, slice(n_off, None)) for a in (x0, x1, y))
    t = UNIFORM.sample(key_diag, n_diag)
    step = 0.0
    if name in ('meanflow', 'imf'):
      # MeanFlow sets r = t on rows of the same sorted (t, r) draw: its t_MF = max of two draws,
      # the pair's s = min of two draws in fmjax time (Gsunshine/meanflow, sample_tr).
      t = times_lib.sample_pairs(key_diag, n_diag, times_lib.TimeDistribution(**MEANFLOW_TIMES))[0]
    if name == 'shortcut':
      # Flow matching at the finest step d = 1/128 from grid times j/128 (kvfrans/shortcut-models,
      # targets_shortcut.py: dt_base = log2(denoise_timesteps)), target x1 - x0.
      t = jax.random.randint(key_diag, (n_diag,), 0, 128) / 128
      step = 1 / 128
    xt = o['interp'].sample(t, d0, d1)
    if name in ('meanflow', 'imf'):
      t_mf = 1.0 - t
      dist = msq(apply(net, t_mf, t_mf, xt, dy) - mf_velocity_target(net, t, xt, d0, d1, dy, o, use_teacher))
    elif name == 'shortcut':
      dist = msq(apply(net, t, t + step, xt, dy) - o['interp'].time_derivative(t, d0, d1))
    else:
      target = sg(o['teacher_fn'](t, xt, dy)) if use_teacher else o['interp'].time_derivative(t, d0, d1)
      dist = msq(b(net, t, xt, dy) - target)
    per_row.append(weigh(dist, params, t, t + step, o))
  return jnp.mean(jnp.concatenate(per_row))


# ------------------------------------------------------------------------------ the cases

L, T = 'linear', 'trigonometric'
HALF = {'diagonal_fraction': 0.5}
GUIDED = {'omega': 0.6, 'kappa': 0.3, 'null_label': NULL}   # 1 - omega - kappa = 0.1 != kappa
MF = {'times': MEANFLOW_TIMES, **HALF}
SCT_DISPLACEMENT = {'tangent_form': 'displacement', 'time_sampling': 'times'}
CASES = [
    ('flow_matching', L, {'diagonal_fraction': 1.0}),
    ('flow_matching', T, {'diagonal_fraction': 1.0, 'teacher': True}),
    ('lsd', L, {**HALF, 'grad_through_jvp': True}),
    ('lsd', L, {**HALF, 'grad_through_jvp': False}),
    ('lsd', T, {**HALF, 'weighting': 'learned'}),
    ('esd', L, {**HALF, 'eulerian_gradient': 'derivative'}),
    ('esd', L, {**HALF, 'eulerian_gradient': 'residual'}),
    ('esd', T, {**HALF, 'eulerian_gradient': 'primal'}),
    ('psd', L, {**HALF, 'intermediate': 'uniform'}),
    ('psd', T, {**HALF, 'space': 'v', 'weighting': 'adaptive'}),
    ('shortcut', L, HALF),
    ('meanflow', L, {**MF, 'weighting': 'adaptive'}),
    ('meanflow', L, {**MF, **GUIDED, 'weighting': 'adaptive', 'adaptive_eps': 0.01}),
    ('meanflow', L, {**MF, 'omega': 2.0, 'kappa': 0.0, 'null_label': NULL}),
    ('meanflow', T, {**MF, 'teacher': True, 'weighting': 'none'}),
    ('imf', L, {**MF, 'weighting': 'adaptive'}),
    ('imf', L, {**MF, **GUIDED, 'weighting': 'none'}),
    ('sct', L, {**HALF, **SCT_DISPLACEMENT, 'tangent_normalization': 0.1, 'warmup_steps': 100, 'step': 40}),
    ('sct', T, {**HALF, **SCT_DISPLACEMENT, 'tangent_normalization': 0.0, 'warmup_steps': 0, 'teacher': True}),
    ('ect', L, {**HALF, 'gap_schedule': 'linear_time', 'gap_halving_steps': 1000, 'step': 2500,
                'min_gap': 0.05, 'time_sampling': 'times', 'huber_c': 0.00054}),
    ('ect', L, {**HALF, 'gap_schedule': 'linear_time', 'teacher': True, 'step': 0, 'time_sampling': 'times'}),
    ('ect', L, {**HALF, 'gap_halving_steps': 1000, 'step': 2500}),
    ('ect', T, {**HALF, 'teacher': True, 'step': 0}),
    ('ect', T, {**HALF, 'step': 60_000}),
    ('lmd', L, {**HALF, 'grad_through_jvp': True}),
    ('emd', L, {**HALF, 'eulerian_gradient': 'residual'}),
    ('emd', T, {**HALF, 'eulerian_gradient': 'derivative'}),
    ('progressive', L, HALF),
    ('progressive', T, {**HALF, 'intermediate': 'uniform', 'teacher_steps': 3}),
    ('trajectory_distillation', L, {**HALF, 'ode_steps': 3, 'ode_method': 'heun'}),
    ('trajectory_distillation', T, {**HALF, 'ode_steps': 2, 'ode_method': 'rk4'}),
    ('fmm', L, {**HALF, 'ode_steps': 3, 'ode_method': 'heun'}),   # the deprecated alias
]
REFERENCE_ONLY = ('teacher', 'step', 'interp', 'teacher_fn')


def _case_id(case):
  name, interp, o = case
  extras = [f'{k}={v}' for k, v in o.items() if k not in ('times', 'diagonal_fraction', 'null_label')]
  return '-'.join([name, interp[:4]] + extras)


def _inputs(seed=0, labelled=True):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  batch = {'x0': jax.random.normal(k[0], (B, D)),
           'x1': jnp.asarray(M) + jnp.asarray(SD) * jax.random.normal(k[1], (B, D))}
  if labelled:
    batch['labels'] = jnp.array(LABELS)
  return batch, init_net(k[2])


def evaluate_both(name, interp_name, o):
  """(rule value, rule gradient, reference value, reference gradient), all float64."""
  interp = interpolants.get(interp_name)
  teacher = lambda t, x, labels=None: gaussian_velocity(interp, t, x)
  # Explicit weighting, so that the reference does not depend on a rule's default.
  o = {'weighting': 'none', **o, 'interp': interp, 'teacher_fn': teacher}
  batch, net = _inputs()
  if 'step' in o:
    batch['step'] = jnp.asarray(o['step'])
  parameterization = 'meanflow' if name in ('meanflow', 'imf') else 'displacement'
  flow_map = flow_maps.make(parameterization, apply)
  use_teacher = losses.RULES[name].teacher == 'required' or o.get('teacher', False)
  options = {k: v for k, v in o.items() if k not in REFERENCE_ONLY}
  rule = losses.make(name, flow_map, interp, teacher=teacher if use_teacher else None, **options)
  params = rule.init(net, jax.random.PRNGKey(5))
  if 'log_variance' in params:   # init has w = b = 0; make u(s, t) vary so its gradient is seen
    lv = params['log_variance']
    params['log_variance'] = {**lv, 'w': 0.3 * jax.random.normal(jax.random.PRNGKey(6), lv['w'].shape),
                              'b': jnp.asarray(0.2)}
  key = jax.random.PRNGKey(7)
  (value, _), grad = jax.value_and_grad(rule, has_aux=True)(params, batch, key)
  ref_value, ref_grad = jax.value_and_grad(
      lambda p: reference_loss(name, o, p, batch, key))(params)
  return value, grad, ref_value, ref_grad


def test_every_rule_has_a_case():
  assert {name for name, _, _ in CASES} == set(losses.RULES)


@pytest.mark.parametrize('case', CASES, ids=[_case_id(c) for c in CASES])
def test_rule_value_and_gradient_match_the_paper_formula(case):
  name, interp_name, o = case
  value, grad, ref_value, ref_grad = evaluate_both(name, interp_name, o)
  rtol = 1e-6 if name in FLOAT32_TIMES else 1e-10
  assert value.dtype == jnp.float64
  assert float(value) > 1e-3, 'a vanishing loss would make the comparison empty'
  np.testing.assert_allclose(value, ref_value, rtol=rtol)
  flat, ref_flat = (jax.flatten_util.ravel_pytree(g)[0] for g in (grad, ref_grad))
  scale = float(jnp.max(jnp.abs(ref_flat)))
  assert scale > 1e-3
  for (path, leaf), ref_leaf in zip(jax.tree_util.tree_leaves_with_path(grad), jax.tree.leaves(ref_grad)):
    np.testing.assert_allclose(leaf, ref_leaf, rtol=rtol, atol=rtol * scale,
                               err_msg=f'gradient of {jax.tree_util.keystr(path)}')


def test_guided_velocity_is_meanflow_eq_13_on_labelled_rows_and_dI_dt_on_null_rows():
  # v~ = omega dI/dt + kappa v(x | c) + (1 - omega - kappa) v(x | null) (Geng et al. 2025,
  # Eq. 13 and App. B.1), by hand: 0.6 * 1 + 0.3 * 2 + 0.1 * 4 = 1.6 on the labelled row.
  conditional = jnp.array([[1.0], [1.0]])
  guided = eulerian.guided_velocity(conditional, jnp.array([[2.0], [2.0]]), jnp.array([[4.0], [4.0]]),
                                    jnp.array([0, NULL]), NULL, omega=0.6, kappa=0.3)
  np.testing.assert_allclose(guided, [[1.6], [1.0]], rtol=1e-12)
