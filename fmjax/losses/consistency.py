"""Consistency models: flow maps to the data end only, f(x, s) = X_{s,1}(x).

Both rules draw their times as the papers do, from EDM's log-normal noise level sigma, and
map it to fmjax time through sigma(s) = alpha_s / beta_s (I_s / beta_s = x1 + sigma x0:
EDM's y + sigma eps; s = 1 is the data); `time_sampling='times'` uses the rule's `times`.

- sCT / sCD (continuous-time consistency training / distillation, Lu & Song, arXiv
  2410.11081, Alg. 1; equation numbers not checked): the Eulerian rule with t = 1, the
  gradient through the primal only, the tangent w = dI_s/ds (training) or a teacher b_s
  (distillation). Default tangent_form='trigflow': the paper's g in TrigFlow coordinates
  (`trigflow_coordinates` derives tau(s) and x_tau from fmjax's interpolant), with its
  r-weighted sin-cos warmup term, tangent normalization and (through the rule defaults)
  learned adaptive weighting. tangent_form='displacement' is fmjax's earlier simplification
  in f = x + (1 - s) v; `sct_rule` says how the two differ.
- ECT (discrete consistency training, Geng et al., "Consistency models made easy", arXiv
  2406.14548; equation numbers not checked): the finite-difference version,
    E w d(X_{s,1}(I_s), sg[X_{s',1}(I_{s'})]),  s' > s,
  with the same noise for both times. gap_schedule='ect' (default) is the reference
  implementation's mapping (locuslab/ect, training/loss.py:45-50 `t_to_r_sigmoid`, the
  weight `loss / (t - r)` at :92), in sigma:
    r = max(0, sigma (1 - q^-(k + 1) (1 + 8 sigmoid(-sigma)))),  k = floor(step / d),
    s' = sigma^-1(r) (by bisection: any monotone interpolant),  w = 1 / (sigma - r),
  q = gap_decay, d = gap_halving_steps (ECT's `--double`, counted in ticks there, in steps
  here). While r = 0 the target is the data (s' = 1). gap_schedule='linear_time' is fmjax's
  earlier simplification: s' = s + gap, gap = (1 - s) q^-floor(step / d), at least
  min(min_gap, 1 - s), w = 1 / gap in fmjax time (min_gap is used by it only).
  d is sqrt(|e|^2 + c^2) - c with fmjax's per-dimension RMS |e| and c = huber_c = 0 (the
  reference's default on the summed error: the same up to the factor sqrt(D)).
  With a teacher (consistency distillation), I_{s'} is replaced by one Euler step of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fmjax.interpolants import expand
from fmjax.losses import base

sg = base.sg


TANGENT_FORMS = ('trigflow', 'displacement')
TIME_SAMPLINGS = ('log_normal_sigma', 'times')
EDGE = 1e-5   # times are kept in [EDGE, 1 - EDGE], as TimeDistribution clips its draws


def _check(name, value, choices):
  if value not in choices:
    raise ValueError(f'Unknown {name} {value!r}; choose one of {choices}.')


def sample_times(ctx: base.Context, key, n: int, time_sampling: str, sigma_mean: float,
                 sigma_std: float):
  """The rule's times s: EDM's log-normal noise level, log sigma ~ N(sigma_mean, sigma_std^2)
  (ECT and sCM), mapped to fmjax time through sigma(s) = alpha_s / beta_s; or a draw from
  the rule's `times` ('times'). On the linear interpolant s = 1 / (1 + sigma), so the
  log-normal sigma is logit-normal(-sigma_mean, sigma_std) in fmjax time."""
  if time_sampling == 'times':
    return ctx.options.times.sample(key, n)
  sigma = jnp.exp(sigma_mean + sigma_std * jax.random.normal(key, (n,)))
  s = time_of_sigma(ctx.interpolant, sigma, jnp.zeros_like(sigma))
  return jnp.clip(s, EDGE, 1.0 - EDGE)


def trigflow_coordinates(interpolant, s, sigma_data: float):
  """TrigFlow's time and state scale at fmjax time s (Lu & Song, arXiv 2410.11081, Sec. 2).

  TrigFlow writes x_tau = cos(tau) x_data + sin(tau) z, z ~ N(0, sigma_d^2 I), tau = 0 the
  data, tau = pi / 2 the noise. fmjax's I_s = alpha_s x0 + beta_s x_data (x0 ~ N(0, I)) has
  I_s / beta_s = x_data + sigma(s) x0 with sigma = alpha / beta, and x_tau / cos(tau) =
  x_data + sigma_d tan(tau) (z / sigma_d): the same noisy point when the noise levels agree,
    sigma_d tan(tau) = alpha_s / beta_s,   i.e. tau = atan2(alpha_s, sigma_d beta_s),
  and then x_tau = (cos(tau) / beta_s) I_s = (sigma_d / n_s) I_s with
  n_s = sqrt(alpha_s^2 + sigma_d^2 beta_s^2) (cos tau = sigma_d beta_s / n_s, sin tau =
  alpha_s / n_s; sigma_d / n_s is EDM's c_in times sigma_d). Differentiating tan(tau) =
  alpha / (sigma_d beta):
    dtau/ds = sigma_d (alpha'_s beta_s - alpha_s beta'_s) / n_s^2   (< 0: tau runs backwards),
    d(sigma_d / n_s)/ds = -sigma_d (alpha alpha' + sigma_d^2 beta beta') / n_s^3.
  On the trigonometric interpolant with sigma_d = 1: n = 1, tau = pi / 2 (1 - s), x_tau = I_s
  and dtau/ds = -pi / 2. Returns (tau, cos tau, sin tau, scale = sigma_d / n_s,
  dscale/ds, dtau/ds), each of shape [batch].
  """
  a, b = interpolant.alpha(s), interpolant.beta(s)
  ad, bd = interpolant.alpha_dot(s), interpolant.beta_dot(s)
  n = jnp.sqrt(a**2 + (sigma_data * b)**2)
  scale = sigma_data / n
  dscale = -sigma_data * (a * ad + sigma_data**2 * b * bd) / n**3
  dtau = sigma_data * (ad * b - a * bd) / n**2
  return jnp.arctan2(a, sigma_data * b), sigma_data * b / n, a / n, scale, dscale, dtau


def sct_rule(ctx: base.Context, tangent_normalization: float = 0.1, warmup_steps: int = 10_000,
             tangent_form: str = 'trigflow', trigflow_sigma_data: float = 0.5,
             time_sampling: str = 'log_normal_sigma', sigma_mean: float = -1.0,
             sigma_std: float = 1.4):
  """sCT (teacher None) / sCD (teacher given), Lu & Song, arXiv 2410.11081.

  tangent_form='trigflow' (default): Alg. 1 of the paper in TrigFlow coordinates
  (`trigflow_coordinates`). The consistency function is fmjax's map to the data end,
  f(x_tau, tau) = X_{s,1}(I_s), read through TrigFlow's parameterization
  f = cos(tau) x_tau - sin(tau) sigma_d F, so F = (cos(tau) x_tau - f) / (sigma_d sin(tau)).
  With d/dtau the total derivative along dx_tau/dtau (the conditional cos(tau) z - sin(tau)
  x_data, or the teacher's velocity) and r = min(1, step / warmup_steps),
    g = -cos^2(tau) (sigma_d F - dx_tau/dtau) - r cos(tau) sin(tau) (x_tau + sigma_d dF/dtau),
  i.e. g = cos(tau) (A + r B) with df/dtau = A + B, A = -cos(tau)(sigma_d F - dx_tau/dtau)
  (so B = df/dtau - A needs no derivative of F); g <- g / (|g| + c); the loss is
  |F - sg(F) - sg(g)|^2 (value |g|^2, gradient through F only). df/dtau comes from one jvp of
  (s, I_s) -> X_{s,1}(I_s) along (1, dI_s/ds), divided by dtau/ds.
  Paper defaults (Alg. 1, Sec. 4, App. G; values not checked against the text, taken from
  third-party sCM code in the stored search): c = 0.1, sigma_d = 0.5, log sigma ~
  N(-1.0, 1.4^2) (CIFAR-10), the learned adaptive weight e^{-u} |.|^2 + u (fmjax's
  weighting='learned', set for `sct` in fmjax.losses.RULES), warmup over 10k iterations.
  |g| is fmjax's per-dimension RMS (the paper writes ||g||; some ports use the full norm).

  tangent_form='displacement' (fmjax's earlier simplification): in the displacement form
  f = x + (1 - s) v, regress v onto sg[v - g], g = -df/ds = v - w - r (1 - s) Dv (Dv the
  total derivative of v along (1, w)); the warmup ramps only (1 - s) Dv, which matches the
  paper's term only when the network is read as v, and the cos(tau) factor (the paper's
  prior weighting 1 / (sigma_d tan(tau)) folded into g) is absent. The earlier defaults
  were tangent_form='displacement', time_sampling='times', warmup_steps=0, weighting='none'.
  """
  _check('tangent_form', tangent_form, TANGENT_FORMS)
  _check('time_sampling', time_sampling, TIME_SAMPLINGS)
  if trigflow_sigma_data <= 0:
    raise ValueError(f'trigflow_sigma_data must be > 0, got {trigflow_sigma_data}.')
  fm = ctx.flow_map
  sd = trigflow_sigma_data

  def off_diagonal(params, rows, key, step):
    n = rows.x1.shape[0]
    s = sample_times(ctx, key, n, time_sampling, sigma_mean, sigma_std)
    t = jnp.ones_like(s)
    x_s = ctx.interpolant.sample(s, rows.x0, rows.x1)
    w = base.tangent_velocity(ctx, s, x_s, rows)
    ramp = jnp.minimum(1.0, step / warmup_steps) if warmup_steps else 1.0
    if tangent_form == 'displacement':
      v, dv = jax.jvp(lambda ss, xx: fm.v(params['net'], ss, t, xx, rows.labels),
                      (s, x_s), (jnp.ones_like(s), w))
      residual = v - w - ramp * expand(t - s, v) * dv
      prediction = v
    else:
      f, df_ds = jax.jvp(lambda ss, xx: fm.X(params['net'], ss, t, xx, rows.labels),
                         (s, x_s), (jnp.ones_like(s), w))
      _, cos, sin, scale, dscale, dtau = (expand(q, x_s) for q in
                                          trigflow_coordinates(ctx.interpolant, s, sd))
      x_tau = scale * x_s
      dx_tau = (dscale * x_s + scale * w) / dtau
      prediction = (cos * x_tau - f) / (sd * sin)                         # F
      df = sg(df_ds / dtau)
      a_term = -cos * (sd * sg(prediction) - dx_tau)
      residual = -cos * (a_term + ramp * (df - a_term))                # -g: F regresses onto sg(F + g)
    if tangent_normalization > 0:
      residual = base.normalize_rows(residual, tangent_normalization)
    return base.mean_square(base.regress(prediction, residual)), s, t, {}

  return base.two_part_rule(ctx, off_diagonal)


GAP_SCHEDULES = ('ect', 'linear_time')
# ECT's sigmoid mapping constants (locuslab/ect, ct_train.py defaults -k 8 -b 1).
ECT_K, ECT_B = 8.0, 1.0


def edm_sigma(interpolant, s):
  """EDM noise level of fmjax time s: alpha(s) / beta(s) (infinite at s = 0, 0 at s = 1)."""
  return interpolant.alpha(s) / jnp.maximum(interpolant.beta(s), jnp.finfo(s.dtype).tiny)


def time_of_sigma(interpolant, sigma, lower, iterations: int = 64):
  """The s in [lower, 1] with edm_sigma(s) = sigma, by bisection (sigma(s) decreases in s)."""
  def halve(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    above = edm_sigma(interpolant, mid) > sigma      # mid is still too noisy: move up
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)
  lo, hi = jax.lax.fori_loop(0, iterations, halve, (lower, jnp.ones_like(lower)))
  return jnp.where(sigma <= 0, 1.0, hi)


def ect_rule(ctx: base.Context, gap_schedule: str = 'ect', gap_decay: float = 2.0,
             gap_halving_steps: int = 25_000, min_gap: float = 1e-3,
             huber_c: float = 0.0, time_sampling: str = 'log_normal_sigma',
             sigma_mean: float = -1.1, sigma_std: float = 2.0):
  """ECT (teacher None) / discrete consistency distillation (teacher given); see the module
  docstring for the two gap schedules.

  Defaults are the reference implementation's (locuslab/ect): times log sigma ~
  N(-1.1, 2.0^2) (training/loss.py:13 and :54-55, ct_train.py:65-66), the distance
  sqrt(|e|^2 + c^2) - c with c = 0 (training/loss.py:86-89, ct_train.py:75), i.e. the L2
  norm of the error; fmjax's |e| is the per-dimension RMS, so the loss is the reference's
  divided by sqrt(D) (same minimizer). huber_c = 0.00054 is iCT's constant on that scale
  (Song & Dhariwal 2023), fmjax's earlier default; time_sampling='times' draws s from the
  rule's `times` (fmjax's earlier uniform default).
  """
  _check('gap_schedule', gap_schedule, GAP_SCHEDULES)
  _check('time_sampling', time_sampling, TIME_SAMPLINGS)
  if huber_c < 0:
    raise ValueError(f'huber_c must be >= 0, got {huber_c}.')
  fm = ctx.flow_map
  c = huber_c

  def off_diagonal(params, rows, key, step):
    n = rows.x1.shape[0]
    s = sample_times(ctx, key, n, time_sampling, sigma_mean, sigma_std)
    one = jnp.ones_like(s)
    stage = jnp.floor(step / gap_halving_steps)
    if gap_schedule == 'ect':
      sigma = edm_sigma(ctx.interpolant, s)
      decay = gap_decay ** -(stage + 1)
      r = jnp.maximum(0.0, sigma * (1.0 - decay * (1.0 + ECT_K * jax.nn.sigmoid(-ECT_B * sigma))))
      s_next = sg(time_of_sigma(ctx.interpolant, r, s))
      # ECT's weight 1 / (t - r) in sigma; at s = 1 (sigma = r = 0) the error is 0 too.
      weight = 1.0 / jnp.maximum(sigma - r, jnp.finfo(s.dtype).tiny)
    else:
      gap = jnp.maximum((1.0 - s) * gap_decay ** -stage, jnp.minimum(min_gap, 1.0 - s))
      s_next = s + gap
      weight = 1.0 / gap
    gap = s_next - s
    x_s = ctx.interpolant.sample(s, rows.x0, rows.x1)
    if ctx.teacher is None:
      x_next = ctx.interpolant.sample(s_next, rows.x0, rows.x1)
    else:
      x_next = x_s + expand(gap, x_s) * sg(ctx.teacher(s, x_s, rows.labels))
    target = sg(fm.X(params['net'], s_next, one, x_next, rows.labels))
    error = fm.X(params['net'], s, one, x_s, rows.labels) - target
    return base.pseudo_huber(error, c) * weight, s, one, {'gap': jnp.mean(gap)}

  return base.two_part_rule(ctx, off_diagonal)
