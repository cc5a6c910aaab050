"""Mutation check: each mistake below, applied alone to a scratch copy, must fail a test.

  .venv/bin/python tools/mutations.py [--scratch /tmp/mut] [--only NAME ...]

Copies the repository (without .git) to the scratch folder once per mutation, replaces one
exact snippet or a few (each must occur exactly once, so a stale entry is an error, not a silent
pass), runs the gradient and exact-formula tests there and prints the tests that fail.
Exits non-zero if any mutation survives. docs/mutations.md lists the results.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = ['tests/test_rule_gradients.py', 'tests/test_exact_formulas.py']


class Mutation(NamedTuple):
  name: str
  path: str
  edits: tuple   # (old, new) snippet pairs, applied together
  tests: tuple = ()   # test files run in addition to TESTS
  alone: bool = False   # run only `tests`, not TESTS (mistakes outside the loss rules)


def mutation(name, path, *pairs, tests=(), alone=False):
  """A mutation of one file: the first pair is (old, new), further pairs belong to the same mistake."""
  return Mutation(name, path, tuple(zip(pairs[::2], pairs[1::2])), tuple(tests), alone)


# The papers' own notation for sCT's TrigFlow form and ECT's time draw (finite differences).
CONSISTENCY_TESTS = ['tests/test_reference_consistency.py']


MUTATIONS = [
    mutation('LSD target velocity not stopped', 'fmjax/losses/lagrangian.py',
             "return sg(fm.velocity(params['net'], t, x, labels))",
             "return fm.velocity(params['net'], t, x, labels)"),
    mutation('ESD transport term not stopped', 'fmjax/losses/eulerian.py',
             'fm.X(sg(net), s, t, xx, labels), (x,), (w,))[1]\n    return dX_ds + sg(transport)',
             'fm.X(net, s, t, xx, labels), (x,), (w,))[1]\n    return dX_ds + transport'),
    mutation('ESD tangent w not stopped', 'fmjax/losses/eulerian.py',
             "w = sg(fm.velocity(params['net'], s, x_s, rows.labels))",
             "w = fm.velocity(params['net'], s, x_s, rows.labels)"),
    mutation('PSD gradient through its target', 'fmjax/losses/semigroup.py',
             'inner = lambda a, b, x: fm.X(sg(net), a, b, x, rows.labels)',
             'inner = lambda a, b, x: fm.X(net, a, b, x, rows.labels)',
             '- sg(inner(u, t, x_u))', '- inner(u, t, x_u)'),
    mutation("MeanFlow's and iMF's tangents swapped", 'fmjax/losses/eulerian.py',
             'w = v_c if improved else target', 'w = target if improved else v_c'),
    mutation('guidance kappa and (1 - omega - kappa) swapped', 'fmjax/losses/eulerian.py',
             'guided = omega * conditional_velocity + (1.0 - omega - kappa) * model_unconditional',
             'guided = omega * conditional_velocity + kappa * model_unconditional',
             '    guided = guided + kappa * model_conditional',
             '    guided = guided + (1.0 - omega - kappa) * model_conditional'),
    mutation('diagonal rows: conditional branch replaced by the unconditional one',
             'fmjax/losses/eulerian.py',
             'return target_velocity(t, x_t, rows, sg(prediction), v_u)',
             'return target_velocity(t, x_t, rows, v_u, v_u)'),
    mutation('sCT tangent normalised by |g|^2 instead of |g|', 'fmjax/losses/base.py',
             'norm = jnp.sqrt(mean_square(err))', 'norm = mean_square(err)'),
    mutation("ECT teacher step taken at the wrong time (s')", 'fmjax/losses/consistency.py',
             'sg(ctx.teacher(s, x_s, rows.labels))', 'sg(ctx.teacher(s_next, x_s, rows.labels))'),
    mutation("ECT teacher step taken from the wrong point (I_s' instead of I_s)", 'fmjax/losses/consistency.py',
             'sg(ctx.teacher(s, x_s, rows.labels))',
             'sg(ctx.teacher(s, ctx.interpolant.sample(s_next, rows.x0, rows.x1), rows.labels))'),
    mutation('midpoint ODE step evaluates the velocity at s', 'fmjax/samplers.py',
             'return x + h * velocity(0.5 * (s + t), x + 0.5 * h * k1)',
             'return x + h * velocity(s, x + 0.5 * h * k1)'),
    mutation('midpoint NFE count set to 1', 'fmjax/samplers.py', "'midpoint': 2", "'midpoint': 1"),
    mutation('x-prediction c_skip uses sigma_data instead of sigma_data^2', 'fmjax/flow_maps.py',
             'c_skip = b * self.sigma_data**2 * c_in**2', 'c_skip = b * self.sigma_data * c_in**2'),
    # Our own.
    mutation('adaptive weight not stopped', 'fmjax/losses/base.py',
             'return sg(1.0 / (summed + options.adaptive_eps) ** options.adaptive_power) * per_row',
             'return 1.0 / (summed + options.adaptive_eps) ** options.adaptive_power * per_row'),
    mutation('adaptive weight on the per-dimension mean instead of the summed square', 'fmjax/losses/base.py',
             'summed = per_row * num_dims', 'summed = per_row'),
    mutation('MeanFlow diagonal time uniform instead of the pair draw', 'fmjax/losses/eulerian.py',
             "times_fn = pair_start if diagonal_time == 'pair' else None", 'times_fn = None'),
    mutation('MeanFlow diagonal time the later time of the pair', 'fmjax/losses/eulerian.py',
             'return times_lib.sample_pairs(key, n, options.times)[0]',
             'return times_lib.sample_pairs(key, n, options.times)[1]'),
    mutation('shortcut flow-matching rows at d = 0 instead of the finest step', 'fmjax/losses/semigroup.py',
             'diagonal_step=1.0 / cells)', 'diagonal_step=0.0)'),
    mutation('learned log-variance: random features not stopped', 'fmjax/losses/base.py',
             "st @ sg(params['frequencies'])", "st @ params['frequencies']"),
    mutation('semigroup v-space target weights swapped', 'fmjax/losses/semigroup.py',
             'target = (lam * fm.v(sg(net), s, u, x_s, rows.labels)\n'
             '                + (1.0 - lam) * fm.v(sg(net), u, t, x_u, rows.labels))',
             'target = ((1.0 - lam) * fm.v(sg(net), s, u, x_s, rows.labels)\n'
             '                + lam * fm.v(sg(net), u, t, x_u, rows.labels))'),
    mutation('LMD teacher (and its point X) not stopped', 'fmjax/losses/lagrangian.py',
             'return sg(ctx.teacher(t, x, labels))', 'return ctx.teacher(t, x, labels)',
             'error = dX_dt - target_velocity(params, t, sg(X), rows.labels)',
             'error = dX_dt - target_velocity(params, t, X, rows.labels)'),
    mutation('iMF compound velocity with + (t - s) Dv', 'fmjax/losses/eulerian.py',
             'error = base.regress(v, v - expand(t - s, v) * dv - target)',
             'error = base.regress(v, v + expand(t - s, v) * dv - target)'),
    mutation('LSD (grad_through_jvp=False) gradient through dv/dt too', 'fmjax/losses/lagrangian.py',
             'error = base.regress(v, residual)', 'error = residual'),
    mutation('sCT tangent warmup ignored', 'fmjax/losses/consistency.py',
             'ramp = jnp.minimum(1.0, step / warmup_steps) if warmup_steps else 1.0', 'ramp = 1.0'),
    mutation("sCT warmup ramps the cos^2 term instead of TrigFlow's r-weighted sin-cos term",
             'fmjax/losses/consistency.py',
             'residual = -cos * (a_term + ramp * (df - a_term))',
             'residual = -cos * (ramp * a_term + (df - a_term))', tests=CONSISTENCY_TESTS),
    mutation("sCT tangent without its cos(tau) factor (the paper's prior weight)", 'fmjax/losses/consistency.py',
             'residual = -cos * (a_term + ramp', 'residual = -(a_term + ramp', tests=CONSISTENCY_TESTS),
    mutation('TrigFlow dtau/ds with the wrong sign', 'fmjax/losses/consistency.py',
             'dtau = sigma_data * (ad * b - a * bd) / n**2', 'dtau = sigma_data * (a * bd - ad * b) / n**2',
             tests=CONSISTENCY_TESTS),
    mutation('log-normal sigma draw with the mean negated', 'fmjax/losses/consistency.py',
             'sigma = jnp.exp(sigma_mean + sigma_std', 'sigma = jnp.exp(-sigma_mean + sigma_std',
             tests=CONSISTENCY_TESTS),
    mutation('ECT without the 1 / gap weight', 'fmjax/losses/consistency.py',
             'return base.pseudo_huber(error, c) * weight, s, one', 'return base.pseudo_huber(error, c), s, one'),
    mutation("ECT mapping without its sigmoid adjustment (ECT's 'const' mapping)", 'fmjax/losses/consistency.py',
             '(1.0 + ECT_K * jax.nn.sigmoid(-ECT_B * sigma))', '1.0'),
    mutation('ECT stage off by one (q^-k instead of q^-(k + 1))', 'fmjax/losses/consistency.py',
             'decay = gap_decay ** -(stage + 1)', 'decay = gap_decay ** -stage'),
    mutation('ECT weight 1 / gap in fmjax time instead of 1 / (sigma - r)', 'fmjax/losses/consistency.py',
             'weight = 1.0 / jnp.maximum(sigma - r, jnp.finfo(s.dtype).tiny)', 'weight = 1.0 / (s_next - s)'),
    mutation('progressive teacher back to one Heun step per half jump', 'fmjax/losses/semigroup.py',
             'TEACHER_STEPS = 8', 'TEACHER_STEPS = 1'),
    mutation('Eulerian primal placement through the whole residual', 'fmjax/losses/eulerian.py',
             'return base.regress(v, v - w - expand(t - s, v) * dv)',
             'return v - w - expand(t - s, v) * dv'),
    mutation("semigroup v-space: second jump from x_s instead of X_{s,u}(x_s)", 'fmjax/losses/semigroup.py',
             '* fm.v(sg(net), u, t, x_u, rows.labels))', '* fm.v(sg(net), u, t, x_s, rows.labels))'),
    mutation('learned weighting on the diagonal at (0, t)', 'fmjax/losses/base.py',
             'return weigh(raw, params, t, t + step, ctx.options, num_dims(rows.x1)), raw, t',
             'return weigh(raw, params, 0 * t, t + step, ctx.options, num_dims(rows.x1)), raw, t'),
    mutation('mean_square reduces float64 in float32', 'fmjax/losses/base.py',
             'err = err.astype(jnp.promote_types(err.dtype, jnp.float32))', 'err = err.astype(jnp.float32)'),
    # iMF with guidance inputs: tests/test_reference_imf.py's finite-difference reference.
    mutation("iMF guided target (1 - 1/omega) replaced by CFG's (omega - 1)", 'fmjax/losses/imf.py',
             'expand(1.0 - 1.0 / omega, v_c) * (v_c - v_u)', 'expand(omega - 1.0, v_c) * (v_c - v_u)',
             tests=('tests/test_reference_imf.py',)),
    mutation('iMF guidance scale drawn uniformly instead of log-uniformly', 'fmjax/losses/imf.py',
             'return jnp.exp(u * jnp.log(omega_max))', 'return 1.0 + u * (omega_max - 1.0)',
             tests=('tests/test_reference_imf.py',)),
    # iMF's two heads from one trunk pass: the reference test and the FLOP count.
    mutation("iMF velocity head's loss reads the average head", 'fmjax/losses/imf.py',
             'v_head - target if with_head', 'v - target if with_head',
             tests=('tests/test_reference_imf.py',)),
    mutation("both_heads returns the average head twice", 'fmjax/losses/imf.py',
             'return average, getattr(dataclasses.replace(flow_map, apply=reuse), method)(params, *args)',
             'return average, average', tests=('tests/test_reference_imf.py',)),
    mutation("iMF diagonal evaluates its two heads in two network passes", 'fmjax/losses/imf.py',
             "prediction, head = both_heads(fm, 'velocity', net, t, x_t, cond)",
             'prediction, head = fm.velocity(net, t, x_t, cond), velocity_map.velocity(net, t, x_t, cond)',
             tests=('tests/test_flops.py',)),
]


# The SD-VAE against diffusers' goldens; the latent datasets; evaluation through the decoder.
VAE_TESTS = ['tests/test_autoencoders.py']
LATENT_TESTS = ['tests/test_latents.py', 'tests/test_image_folder.py']
DECODE_TESTS = ['tests/test_latent_pipeline.py', 'tests/test_sweep.py']
_KL, _VAE, _LOAD = 'fmjax/autoencoders/kl.py', 'fmjax/autoencoders/vae.py', 'fmjax/autoencoders/loading.py'

MUTATIONS += [
    mutation('VAE logvar clamp bounds swapped', _KL, 'jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)',
             'jnp.clip(logvar, LOGVAR_MAX, LOGVAR_MIN)', tests=VAE_TESTS, alone=True),
    mutation('VAE logvar clamp [-20, 30] instead of [-30, 20]', _KL,
             'LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0', 'LOGVAR_MIN, LOGVAR_MAX = -20.0, 30.0', tests=VAE_TESTS, alone=True),
    mutation('VAE logvar not clamped', _KL, 'logvar = jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)', 'pass',
             tests=VAE_TESTS, alone=True),
    mutation('VAE std = exp(logvar)', _KL, 'jnp.exp(0.5 * logvar)', 'jnp.exp(logvar)', tests=VAE_TESTS, alone=True),
    mutation('VAE mean and logvar halves swapped', _KL, 'mean, logvar = jnp.split(', 'logvar, mean = jnp.split(',
             tests=VAE_TESTS, alone=True),
    mutation('VAE downsample padding symmetric', _KL, 'jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))',
             'jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))', tests=VAE_TESTS, alone=True),
    mutation('VAE downsample padding at top/left', _KL, 'jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))',
             'jnp.pad(x, ((0, 0), (1, 0), (1, 0), (0, 0)))', tests=VAE_TESTS, alone=True),
    mutation('VAE 32 GroupNorm groups instead of the config', _KL, 'num_groups=self.groups', 'num_groups=32',
             tests=VAE_TESTS, alone=True),
    mutation('VAE GroupNorm eps 1e-5', _KL, 'GROUP_NORM_EPS = 1e-6', 'GROUP_NORM_EPS = 1e-5', tests=VAE_TESTS, alone=True),
    mutation('VAE attention residual skipped', _KL, 'return x + self.to_out(o).reshape(b, h, w, c)',
             'return self.to_out(o).reshape(b, h, w, c)', tests=VAE_TESTS, alone=True),
    mutation('VAE attention scores scaled by 1/C', _KL,
             'preferred_element_type=jnp.float32) / math.sqrt(c)', 'preferred_element_type=jnp.float32) / c',
             tests=VAE_TESTS, alone=True),
    mutation('VAE scaling_factor hardcoded 0.18215', _VAE, 'return float(self.config.scaling_factor)',
             'return 0.18215', tests=VAE_TESTS, alone=True),
    mutation('VAE mid block: attention after the second resnet', _KL,
             '    x = self.resnets[0](x)\n    if self.attention is not None:\n      x = self.attention(x)\n'
             '    return self.resnets[1](x)',
             '    x = self.resnets[1](self.resnets[0](x))\n'
             '    return self.attention(x) if self.attention is not None else x', tests=VAE_TESTS, alone=True),
    mutation('VAE post_quant_conv skipped', _KL, '      z = self.post_quant_conv(z)', '      pass', tests=VAE_TESTS, alone=True),
    mutation('VAE conv kernel loaded with I and O swapped', _LOAD,
             'return np.ascontiguousarray(a.transpose(2, 3, 1, 0))',
             'return np.ascontiguousarray(a.transpose(2, 3, 0, 1))', tests=VAE_TESTS, alone=True),
    mutation('VAE upsample tiled instead of nearest', _KL, 'jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)',
             'jnp.tile(x, (1, 2, 2, 1))', tests=VAE_TESTS, alone=True),
    mutation('VAE extra tensors silently ignored', _LOAD, "('unused tensors', unused), ", '', tests=VAE_TESTS, alone=True),
    mutation('latent draw forgets the scaling factor', 'fmjax/data/pipelines.py',
             '((mean + std * eps) * np.float32(scaling_factor))', '((mean + std * eps))', tests=LATENT_TESTS, alone=True),
    mutation('latent draw always takes the flip', 'fmjax/data/pipelines.py',
             "suffix = '_flip' if rng.random() < 0.5 else ''", "suffix = '_flip'", tests=LATENT_TESTS, alone=True),
    mutation('latent draw uses the variance for the std', 'fmjax/data/pipelines.py',
             'eps = rng.standard_normal(mean.shape, dtype=np.float32)',
             'eps = rng.standard_normal(mean.shape, dtype=np.float32); std = std * std', tests=LATENT_TESTS, alone=True),
    mutation('latent builder flips the image upside down', 'fmjax/data/latents.py',
             'np.concatenate([x, x[:, :, ::-1]])', 'np.concatenate([x, x[:, ::-1]])', tests=LATENT_TESTS, alone=True),
    mutation('latent builder scales images to [0, 1]', 'fmjax/data/latents.py',
             'x = images.astype(np.float32) / 127.5 - 1.0', 'x = images.astype(np.float32) / 255.0',
             tests=LATENT_TESTS, alone=True),
    mutation('latent builder resume redoes finished chunks', 'fmjax/data/latents.py',
             'todo = [b for b in bounds if not os.path.exists(_chunk_path(work, b[0]))]',
             'todo = list(bounds)', tests=LATENT_TESTS, alone=True),
    mutation('latent builder takes no lock (two builds write one dataset)', 'fmjax/data/latents.py',
             'fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)', 'pass', tests=LATENT_TESTS, alone=True),
    mutation('latent builder locks only the split (another split writes meanwhile)', 'fmjax/data/latents.py',
             '  lock_path = final + LOCK_SUFFIX\n', '  lock_path = final + LOCK_SUFFIX + split\n',
             tests=LATENT_TESTS, alone=True),
    mutation('ADM crop: bicubic resize with floor instead of round', 'fmjax/data/image_folder.py',
             'tuple(round(x * scale) for x in pil_image.size)', 'tuple(int(x * scale) for x in pil_image.size)',
             tests=LATENT_TESTS, alone=True),
    mutation('decoder fed the scaled latents', _VAE,
             'return self.decode_fn(params, scaled_latents / self.scaling_factor)',
             'return self.decode_fn(params, scaled_latents)', tests=DECODE_TESTS, alone=True),
    mutation('precision/recall of all samples, not the first N', 'fmjax/evaluation/sweep.py',
             'sample_features = np.concatenate(kept_features)[:precision_recall_samples]',
             'sample_features = np.concatenate(kept_features)',
             "if with_pr and sum(len(f) for f in kept_features) < precision_recall_samples:",
             'if with_pr:', tests=DECODE_TESTS, alone=True),
    mutation('FID provenance ignores the crop', 'fmjax/evaluation/fid.py',
             "COMPARABLE_FIELDS = ('feature_extractor', 'resize', 'crop', 'autoencoder')",
             "COMPARABLE_FIELDS = ('feature_extractor', 'resize', 'autoencoder')", tests=DECODE_TESTS, alone=True),
    mutation('classifier share: any confident class counts, not the requested one',
             'fmjax/evaluation/sweep.py',
             'right = probs[np.arange(len(probs)), np.clip(requested, 0, num_classes - 1)] >= confidence',
             'right = probs.max(axis=1) >= confidence', tests=DECODE_TESTS, alone=True),
    mutation('class TV without the factor 1/2', 'fmjax/evaluation/sweep.py',
             "'class_tv': float(0.5 * np.abs(", "'class_tv': float(np.abs(", tests=DECODE_TESTS, alone=True),
    mutation("a run accepts another VAE's latents", 'fmjax/from_config.py',
             "  if latent_info['autoencoder_digest'] != autoencoder.digest:",
             "  if False:", tests=DECODE_TESTS, alone=True),
]

# Mistakes outside the loss rules, each caught by tests at non-degenerate settings (temperature
# != 1, decay != 0.5, std != 1, class-conditional models with labels, several groups).
# Steering maths (fmjax/steering/).
_SMC = 'fmjax/steering/smc.py'
_SX = 'tests/test_steering_smc_exact.py'
_SEL = 'tests/test_steering_selection.py'
FT_TESTS = ['tests/test_steering_finetune_exact.py']
STEERING_MUTATIONS = [
    mutation('steering: smc twist multiplies by lambda', _SMC,
             'v_now = _finite_twist(values / lam, grouped)', 'v_now = _finite_twist(values * lam, grouped)',
             tests=[f'{_SX}::test_one_guided_step_by_hand'], alone=True),
    mutation('steering: smc final reward multiplies by lambda', _SMC,
             'increment = final / lam - v_prev + correction', 'increment = final * lam - v_prev + correction',
             tests=[f'{_SX}::test_one_guided_step_by_hand'], alone=True),
    mutation('steering: smc control sign flipped (the weights stay exact)', _SMC,
             'u = 2 * eps * scale * grad / lam', 'u = -2 * eps * scale * grad / lam',
             tests=[f'{_SX}::test_one_guided_step_by_hand'], alone=True),
    mutation('steering: smc control without the factor 2 of sigma^2 = 2 eps', _SMC,
             'u = 2 * eps * scale * grad / lam', 'u = eps * scale * grad / lam',
             tests=[f'{_SX}::test_one_guided_step_by_hand'], alone=True),
    mutation('steering: smc final resampling across groups', _SMC,
             '    idx = (idx + num_particles * jnp.arange(groups)[:, None]).reshape(-1)\n    x, lab = _take',
             '    idx = idx.reshape(-1)\n    x, lab = _take',
             tests=[f'{_SX}::test_final_resampling_stays_within_each_group'], alone=True),
    mutation('steering: smc resampled groups draw from group 0', _SMC,
             "    idx = jnp.where(do[:, None], idx, jnp.arange(num_particles)[None])\n"
             "    idx = (idx + num_particles * jnp.arange(groups)[:, None]).reshape(-1)",
             "    idx = jnp.where(do[:, None], idx, jnp.arange(num_particles)[None]\n"
             "                    + num_particles * jnp.arange(groups)[:, None]).reshape(-1)",
             tests=[f'{_SX}::test_final_resampling_stays_within_each_group'], alone=True),
    mutation('steering: smc final weights normalized over all groups, not per group', _SMC,
             'log_w = (grouped(log_w) - jax.scipy.special.logsumexp(grouped(log_w), -1, keepdims=True)).reshape(-1)',
             'log_w = log_w - jax.scipy.special.logsumexp(log_w)',
             tests=[f'{_SX}::test_one_guided_step_by_hand'], alone=True),
    mutation('steering: smc -inf look-ahead twist kept as -inf', _SMC,
             'v_now = _finite_twist(values / lam, grouped)', 'v_now = values / lam',
             tests=[f'{_SX}::test_hard_constraint_gives_the_truncated_tilted_law'], alone=True),
    mutation('steering: smc labels not resampled with their particles', _SMC,
             'x, lab, x1_hat, v_now, grad = _take((x, lab, x1_hat, v_now, grad), idx)',
             'x, x1_hat, v_now, grad = _take((x, x1_hat, v_now, grad), idx)',
             tests=[f'{_SX}::test_class_conditional_smc_moves_labels_with_their_rows'], alone=True),
    mutation('steering: smc final resampling leaves the labels behind', _SMC,
             'x, lab = _take((x, lab), idx)', 'x = x[idx]',
             tests=[f'{_SX}::test_final_resampling_stays_within_each_group'], alone=True),
    mutation('steering: NaN rewards pass the check (only +inf counted)', 'fmjax/steering/result.py',
             'bad = jnp.sum(jnp.isnan(values) | (values == jnp.inf))', 'bad = jnp.sum(values == jnp.inf)',
             tests=[f'{_SX}::test_nan_rewards_are_one_clear_error'], alone=True),
    mutation('steering: ESS of unnormalized log-weights', 'fmjax/steering/resampling.py',
             'log_w = log_weights - jax.scipy.special.logsumexp(log_weights, axis=-1, keepdims=True)',
             'log_w = log_weights', tests=[f'{_SX}::test_ess_fraction_is_the_textbook_formula'], alone=True),
    mutation('steering: systematic resampling points spaced by n instead of num',
             'fmjax/steering/resampling.py',
             'points = (jax.random.uniform(key) + jnp.arange(num)) / num',
             'points = (jax.random.uniform(key) + jnp.arange(num)) / n',
             tests=[f'{_SX}::test_systematic_resample_is_the_plain_loop'], alone=True),
    mutation('steering: best-of-N multiplies by the temperature', 'fmjax/steering/selection.py',
             'logits = r / temperature', 'logits = r * temperature',
             tests=[f'{_SEL}::test_importance_selection_frequencies_are_softmax_r_over_lambda'], alone=True),
    mutation('steering: best-of-N candidates labelled by tile instead of repeat', 'fmjax/steering/selection.py',
             'jnp.repeat(jnp.asarray(labels), n, axis=0)', 'jnp.tile(jnp.asarray(labels), n)',
             tests=[f'{_SEL}::test_best_of_n_candidates_keep_their_rows_labels'], alone=True),
    mutation('steering: best-of-N ESS not divided by n', 'fmjax/steering/selection.py',
             'ess = jnp.mean(1.0 / jnp.sum(w**2, axis=1)) / n', 'ess = jnp.mean(1.0 / jnp.sum(w**2, axis=1))',
             tests=[f'{_SEL}::test_importance_selection_frequencies_are_softmax_r_over_lambda'], alone=True),
    mutation('steering: guidance drift multiplies by the temperature', 'fmjax/steering/reward_guidance.py',
             'x = x + (weight / temperature) * grad', 'x = x + (weight * temperature) * grad',
             tests=[f'{_SEL}::test_one_guided_flow_map_step_by_hand'], alone=True),
    mutation('steering: tilted mixture weights drop the spread determinant', 'fmjax/steering/tilted.py',
             ' - 0.5 * d * np.log(spread))', ')', tests=[f'{_SEL}::test_tilted_mixture_against_quadrature'], alone=True),
    mutation('steering: tilted Gaussian divides by the temperature', 'fmjax/steering/tilted.py',
             '  tau = reward_std**2 * temperature\n  new_var = 1.0 / (1.0 / var + 1.0 / tau)\n  new_mean',
             '  tau = reward_std**2 / temperature\n  new_var = 1.0 / (1.0 / var + 1.0 / tau)\n  new_mean',
             tests=[f'{_SEL}::test_tilted_gaussian_against_importance_weights'], alone=True),
    mutation('steering: tilt_log_weights not normalized', 'fmjax/steering/finetune.py',
             'return jax.nn.log_softmax(rewards / temperature)', 'return rewards / temperature',
             tests=FT_TESTS, alone=True),
    mutation('steering: k_step_sample grid off by one', 'fmjax/steering/finetune.py',
             'times = [i / steps for i in range(steps + 1)]', 'times = [i / (steps + 1) for i in range(steps + 1)]',
             tests=FT_TESTS, alone=True),
    mutation('steering: reward_backprop regularizer divides by lambda', 'fmjax/steering/finetune.py',
             'loss = jnp.mean(-r + 0.5 * temperature * regularization * distance)',
             'loss = jnp.mean(-r + 0.5 * regularization * distance / temperature)', tests=FT_TESTS, alone=True),
    mutation('steering: reward_backprop base sample not stopped', 'fmjax/steering/finetune.py',
             'distance = _row_sum_square(x_model - sg(x_base))', 'distance = _row_sum_square(x_model - x_base)',
             tests=FT_TESTS, alone=True),
    mutation('steering: reward_distill labels do not follow the resampled rows', 'fmjax/steering/finetune.py',
             "rows['labels'] = labels_c[pick]", "rows['labels'] = labels", tests=FT_TESTS, alone=True),
    mutation('steering: reward_distill rows not shuffled before the diagonal split', 'fmjax/steering/finetune.py',
             'pick = jax.random.permutation(key_shuffle, systematic_resample(key_pick, log_w, n))',
             'pick = systematic_resample(key_pick, log_w, n)', tests=FT_TESTS, alone=True),
]
# The sampling API and the steer mode (fmjax/api.py, fmjax/cli/steer.py).
API_TESTS = ['tests/test_api.py']
API_STEER_TESTS = ['tests/test_api_steer.py']
STEER_MODE_TESTS = ['tests/test_steer_mode.py']
API_MUTATIONS = [
    mutation('api: chunk offset off by one (later chunks start one noise row early)', 'fmjax/api.py',
             'x = self._sample(self.params, key, first, times,',
             'x = self._sample(self.params, key, max(first - 1, 0), times,',
             tests=API_TESTS, alone=True),
    mutation('api: labels not chunked with rows (every chunk takes the first rows\' labels)',
             'fmjax/api.py',
             'times, _chunk_label(labels, first, chunk),', 'times, _chunk_label(labels, 0, chunk),',
             tests=API_TESTS, alone=True),
    mutation('api: null label for guidance is the last class, not num_classes', 'fmjax/api.py',
             'null_label=self.num_classes or None,', 'null_label=(self.num_classes - 1) or None,',
             tests=API_TESTS, alone=True),
    mutation('api: classifier-free guidance weight applied as (1 - w)', 'fmjax/samplers.py',
             'return unconditional + guidance_scale * (conditional - unconditional)',
             'return unconditional + (1.0 - guidance_scale) * (conditional - unconditional)',
             tests=API_TESTS, alone=True),
    mutation('api: Model.flow_map passes s and t swapped', 'fmjax/api.py',
             "self._times(s, x, 's'), self._times(t, x, 't'), x,",
             "self._times(t, x, 't'), self._times(s, x, 's'), x,",
             tests=API_TESTS, alone=True),
    mutation('api: steer chunks not by whole SMC groups', 'fmjax/api.py',
             'chunk = max(group, min(chunk, num) // group * group)', 'chunk = max(group, min(chunk, num))',
             tests=API_STEER_TESTS, alone=True),
    mutation("api: SMC group keys restart in every chunk (the chunk's group index)",
             'fmjax/steering/methods.py',
             'smc.smc_sample(jax.random.fold_in(key_run, g),',
             'smc.smc_sample(jax.random.fold_in(key_run, g - first // particles),',
             tests=API_STEER_TESTS, alone=True),
    mutation("api: best-of-N candidates drawn from the chunk's own first noise rows",
             'fmjax/steering/methods.py',
             'pieces.noise(key_noise, count, i * n)', 'pieces.noise(key_noise, count, (i - first) * n)',
             tests=API_STEER_TESTS, alone=True),
    mutation('api: steer labels not chunked with rows', 'fmjax/api.py',
             '_chunk_label(labels, first, chunk))', '_chunk_label(labels, 0, chunk))',
             tests=API_STEER_TESTS, alone=True),
    mutation("api: steer's ess averages the last chunk's padding rows too", 'fmjax/api.py',
             'ess.append(np.asarray(ess_chunk)[:(stop - first) // group])',
             'ess.append(np.asarray(ess_chunk))',
             tests=API_STEER_TESTS, alone=True),
    mutation('steer mode: baseline drawn with another seed', 'fmjax/cli/steer.py',
             'baseline = model.sample(jax.random.split(key)[0], num',
             'baseline = model.sample(jax.random.split(key)[1], num',
             tests=STEER_MODE_TESTS, alone=True),
    mutation("steer mode: baseline drawn without the run's labels", 'fmjax/cli/steer.py',
             'baseline = model.sample(jax.random.split(key)[0], num, steps=steps, labels=labels)',
             'baseline = model.sample(jax.random.split(key)[0], num, steps=steps)',
             tests=STEER_MODE_TESTS, alone=True),
    mutation("reward factory: 'one_sided' builds the reward of the wrong axis", 'fmjax/steering/rewards.py',
             "if name == 'one_sided':\n    return one_sided_quadratic()",
             "if name == 'one_sided':\n    return one_sided_quadratic(axis=1)",
             tests=STEER_MODE_TESTS, alone=True),
    mutation('api: steer drops the reward counts (NaN rewards pass silently)', 'fmjax/api.py',
             '    raise_on_bad_rewards(method, check)   # NaN', '    pass   # NaN',
             tests=['tests/test_api_steer.py'], alone=True),
    mutation("api: steer returns the input labels, not the resampled rows' labels", 'fmjax/api.py',
             'out_labels[first:stop] = np.asarray(labels_chunk[:stop - first])',
             'out_labels[first:stop] = labels[first:stop]', tests=['tests/test_api_steer.py'], alone=True),
]
# Evaluation plumbing, time samplers, row drawing, data pipelines, sharding.
PLUMBING_TIMES = ['tests/test_plumbing_times.py']
PLUMBING_SAMPLERS = ['tests/test_plumbing_samplers.py']
PLUMBING_FID = ['tests/test_plumbing_fid.py']
PLUMBING_DATA = ['tests/test_plumbing_data.py']
PLUMBING_MUTATIONS = [
    mutation('plumbing: logit-normal ignores its std', 'fmjax/losses/times.py',
             'u = jax.nn.sigmoid(self.mean + self.std * jax.random.normal(key, (n,)))',
             'u = jax.nn.sigmoid(self.mean + jax.random.normal(key, (n,)))', tests=PLUMBING_TIMES, alone=True),
    mutation("plumbing: logit-normal in MeanFlow's time direction", 'fmjax/losses/times.py',
             'u = jax.nn.sigmoid(self.mean + self.std * jax.random.normal(key, (n,)))',
             'u = 1.0 - jax.nn.sigmoid(self.mean + self.std * jax.random.normal(key, (n,)))',
             tests=PLUMBING_TIMES, alone=True),
    mutation('plumbing: the earlier time of a pair is not the minimum', 'fmjax/losses/times.py',
             'return jnp.minimum(a, b), jnp.maximum(a, b)', 'return a, jnp.maximum(a, b)',
             tests=PLUMBING_TIMES, alone=True),
    mutation('plumbing: no dyadic jump ends at t = 1', 'fmjax/losses/times.py',
             'cells = 2 ** level   #', 'cells = 2 ** level - 1   #', tests=PLUMBING_TIMES, alone=True),
    mutation('plumbing: diagonal row count truncated, not rounded', 'fmjax/losses/base.py',
             'return int(round(batch_size * fraction))', 'return int(batch_size * fraction)',
             tests=PLUMBING_TIMES, alone=True),
    mutation('plumbing: label dropout keeps the dropped labels', 'fmjax/losses/base.py',
             'labels = jnp.where(drop, options.null_label, labels)',
             'labels = jnp.where(drop, labels, options.null_label)', tests=PLUMBING_TIMES, alone=True),
    mutation('plumbing: rows split at the diagonal count', 'fmjax/losses/base.py',
             'off_rows, diag_rows = split_rows(rows, batch_size - n_diag)',
             'off_rows, diag_rows = split_rows(rows, n_diag)', tests=PLUMBING_TIMES, alone=True),
    mutation('plumbing: the loss is the mean of the two parts\' means', 'fmjax/losses/base.py',
             'loss = jnp.mean(jnp.concatenate(parts)) if parts else jnp.zeros(())',
             'loss = sum(jnp.mean(p) for p in parts) / len(parts) if parts else jnp.zeros(())',
             tests=PLUMBING_TIMES, alone=True),
    mutation('plumbing: CFG extrapolates from the conditional branch', 'fmjax/samplers.py',
             'return unconditional + guidance_scale * (conditional - unconditional)',
             'return conditional + guidance_scale * (conditional - unconditional)',
             tests=PLUMBING_SAMPLERS, alone=True),
    mutation('plumbing: CFG null pass uses class 0', 'fmjax/samplers.py',
             'jnp.full_like(labels, null_label)', 'jnp.zeros_like(labels)', tests=PLUMBING_SAMPLERS, alone=True),
    mutation('plumbing: guidance interval not passed to the network', 'fmjax/samplers.py',
             'conditioning.make(labels, guidance_scale, args[0].shape[0], start, end)',
             'conditioning.make(labels, guidance_scale, args[0].shape[0])', tests=PLUMBING_SAMPLERS, alone=True),
    mutation("plumbing: Heun's second stage at the start time", 'fmjax/samplers.py',
             'k2 = velocity(t, x + h * k1)', 'k2 = velocity(s, x + h * k1)', tests=PLUMBING_SAMPLERS, alone=True),
    mutation('plumbing: RK4 with equal stage weights', 'fmjax/samplers.py',
             'return x + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6', 'return x + h * (k1 + k2 + k3 + k4) / 4',
             tests=PLUMBING_SAMPLERS, alone=True),
    mutation('plumbing: uniform grid of k + 1 steps', 'fmjax/samplers.py',
             't = t0 + (i / jnp.asarray(num_steps, jnp.float32)) * (t1 - t0)',
             't = t0 + (i / jnp.asarray(num_steps + 1, jnp.float32)) * (t1 - t0)',
             tests=PLUMBING_SAMPLERS, alone=True),
    mutation('plumbing: guidance-conditioned networks charged a null pass', 'fmjax/evaluation/sweep_samplers.py',
             "config.eval.guidance_scale != 1.0\n            and not config.model.get('guidance_conditioning'))",
             'config.eval.guidance_scale != 1.0)', tests=PLUMBING_SAMPLERS, alone=True),
    mutation('plumbing: CFG not counted in the NFE', 'fmjax/evaluation/sweep_samplers.py',
             'factor = 2 if guided else 1', 'factor = 1', tests=PLUMBING_SAMPLERS, alone=True),
    mutation('plumbing: sweep labels restart every batch', 'fmjax/evaluation/sweep.py',
             '+ i * batch_size)', '+ i)', tests=PLUMBING_SAMPLERS, alone=True),
    mutation('plumbing: energy distance keeps the diagonal in its count', 'fmjax/evaluation/toy_metrics.py',
             'return (jnp.sum(d) - jnp.sum(jnp.diag(d))) / (n * (n - 1))',
             'return (jnp.sum(d) - jnp.sum(jnp.diag(d))) / (n * n)', tests=PLUMBING_SAMPLERS, alone=True),
    mutation('plumbing: FID provenance ignores the resize', 'fmjax/evaluation/fid.py',
             "COMPARABLE_FIELDS = ('feature_extractor', 'resize', 'crop', 'autoencoder')",
             "COMPARABLE_FIELDS = ('feature_extractor', 'crop', 'autoencoder')", tests=PLUMBING_FID, alone=True),
    mutation('plumbing: FID provenance refuses a field only one side records', 'fmjax/evaluation/fid.py',
             'if a is not None and b is not None and not same:', 'if a is not None and not same:',
             tests=PLUMBING_FID, alone=True),
    mutation('plumbing: FID scores the padding rows', 'fmjax/evaluation/sweep.py',
             'local = local[:max(0, min(len(local), valid - start))]', 'local = local',
             tests=PLUMBING_FID, alone=True),
    mutation('plumbing: FID progress printed on every process', 'fmjax/evaluation/sweep.py',
             'if (progress is not None and logging_utils.is_main_process()', 'if (progress is not None',
             tests=PLUMBING_FID, alone=True),
    mutation('plumbing: FID progress not shown during evaluation', 'fmjax/evaluation/evaluator.py',
             'log=_main_print, progress=_main_print,', 'log=_main_print, progress=None,',
             tests=['tests/test_sweep.py::test_image_sweep_fid_with_injected_features'], alone=True),
    mutation('plumbing: feature covariance with ddof 0', 'fmjax/evaluation/fid.py',
             'return (self._outer - self.count * np.outer(centered_sum, centered_sum)) / (self.count - 1)',
             'return (self._outer - self.count * np.outer(centered_sum, centered_sum)) / self.count',
             tests=PLUMBING_FID, alone=True),
    mutation('plumbing: pixels divided by 128', 'fmjax/data/pipelines.py',
             'x1 = image.astype(np.float32) / 127.5 - 1.0', 'x1 = image.astype(np.float32) / 128.0 - 1.0',
             tests=PLUMBING_DATA, alone=True),
    mutation('plumbing: every process reads the whole image stream', 'fmjax/data/pipelines.py',
             'ds = ds[jax.process_index()::jax.process_count()].map(', 'ds = ds.map(',
             tests=PLUMBING_DATA, alone=True),
    mutation('plumbing: latent noise not scaled', 'fmjax/data/pipelines.py',
             "out = {'x1': ((mean + std * eps) * np.float32(scaling_factor)).astype(np.float32)}",
             "out = {'x1': (mean * np.float32(scaling_factor) + std * eps).astype(np.float32)}",
             tests=PLUMBING_DATA, alone=True),
    mutation('plumbing: FSDP shards the first divisible dimension, not the largest', 'fmjax/sharding.py',
             'for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):', 'for dim in range(len(shape)):',
             tests=PLUMBING_DATA, alone=True),
    mutation('plumbing: FSDP size threshold off by one', 'fmjax/sharding.py',
             'int(np.prod(shape, dtype=np.int64)) < min_size', 'int(np.prod(shape, dtype=np.int64)) <= min_size',
             tests=PLUMBING_DATA, alone=True),
    mutation('plumbing: fine-tuning evaluated against the untilted exact map', 'fmjax/evaluation/evaluator.py',
             'target=self.target, interpolant=self.interpolant', 'target=self.source.target, interpolant=self.interpolant',
             tests=['tests/test_plumbing_finetune_eval.py'], alone=True),
    mutation('plumbing: tilted evaluation target ignores the temperature', 'fmjax/evaluation/evaluator.py',
             'lam = float(f.temperature)', 'lam = 1.0', tests=['tests/test_plumbing_finetune_eval.py'], alone=True),
    mutation('plumbing: symlog axis keeps matplotlib\'s ticks', 'fmjax/evaluation/report.py',
             'ax.yaxis.set_major_locator(ticker.FixedLocator(ticks))', 'pass',
             tests=['tests/test_plumbing_report.py'], alone=True),
]
# The run lifecycle: CLI, configs, checkpoints, the training loop and its EMA.
LIFECYCLE = ['tests/test_lifecycle.py']
LIFECYCLE_UNITS = ['tests/test_lifecycle_units.py']   # no training run: seconds
LIFECYCLE_MUTATIONS = [
    mutation('lifecycle: EMA coefficients swapped', 'fmjax/train_state.py',
             'd * e_ + (1.0 - d) * p_', '(1.0 - d) * e_ + d * p_', tests=LIFECYCLE_UNITS, alone=True),
    mutation('lifecycle: EMA warm-up off by one (counts the update being made)', 'fmjax/train_state.py',
             '(1.0 + step) / (10.0 + step)', '(2.0 + step) / (11.0 + step)', tests=LIFECYCLE_UNITS, alone=True),
    mutation('lifecycle: EMA warm-up on for every rule', 'fmjax/configs.py',
             'optim.ema_warmup = config.loss.name in losses.FINETUNE_RULES', 'optim.ema_warmup = True',
             tests=LIFECYCLE_UNITS, alone=True),
    mutation('lifecycle: EMA copies selected in string order', 'fmjax/train_state.py',
             'sorted(ema, key=int)', 'sorted(ema)', tests=LIFECYCLE_UNITS, alone=True),
    mutation('lifecycle: SIGINT not handled (ctrl-C saves nothing)', 'fmjax/train.py',
             'SIGNALS = (signal.SIGTERM, signal.SIGINT)', 'SIGNALS = (signal.SIGTERM,)',
             tests=LIFECYCLE_UNITS, alone=True),
    mutation('lifecycle: a second ctrl-C does not exit', 'fmjax/train.py',
             "if signum == signal.SIGINT and self.signal_name == 'SIGINT':",
             "if signum == signal.SIGINT and self.signal_name == 'SIGTERM':", tests=LIFECYCLE_UNITS, alone=True),
    mutation('lifecycle: SIGINT exits with the preemption status', 'fmjax/train.py',
             "EXIT_CODES = {'SIGTERM': PREEMPTED_EXIT_CODE, 'SIGINT': INTERRUPTED_EXIT_CODE}",
             "EXIT_CODES = {'SIGTERM': PREEMPTED_EXIT_CODE, 'SIGINT': PREEMPTED_EXIT_CODE}",
             tests=LIFECYCLE_UNITS, alone=True),
    mutation('lifecycle: eval mode strict again (every field counts as typed)', 'fmjax/main.py',
             "{k for k in wanted if any(k == o or k.startswith(o + '.') for o in overrides)})",
             "set(wanted))", tests=LIFECYCLE, alone=True),
    mutation("lifecycle: eval mode trains the command line's config", 'fmjax/main.py',
             '  merged = dict(recorded)', '  merged = json.loads(config.to_json_best_effort())',
             tests=LIFECYCLE, alone=True),
    mutation('lifecycle: learning-rate check on the wrong sign', 'fmjax/configs.py',
             'np.isfinite(lr) and lr > 0', 'np.isfinite(lr) and abs(lr) > 0', tests=LIFECYCLE_UNITS, alone=True),
    mutation("lifecycle: damaged-checkpoint message carries the storage layer's text", 'fmjax/checkpointing.py',
             "f'({damage_detail(error, folder)}). Delete", "f'({error}). Delete", tests=LIFECYCLE, alone=True),
    mutation('lifecycle: first console line only after the first log_every steps', 'fmjax/train.py',
             "          if step == first_step + 1:\n            jax.block_until_ready",
             "          if step == first_step + log_every:\n            jax.block_until_ready",
             "    first_step, started = step, time.time()\n",
             "    first_step, started = step, time.time()\n    log_every = train.log_every\n",
             tests=LIFECYCLE, alone=True),
]
# The extension points and the one-resolution rule (docs/architecture.md).
ARCHITECTURE_MUTATIONS = [
    mutation('architecture: a resolved config is resolved again', 'fmjax/configs.py',
             '  if known and (not known[1] or recorded) and known[0] == _fingerprint(config):',
             '  if False:', tests=['tests/test_configs.py'], alone=True),
    mutation('architecture: a config changed after resolution is taken as resolved', 'fmjax/configs.py',
             '  if known and (not known[1] or recorded) and known[0] == _fingerprint(config):',
             '  if known and (not known[1] or recorded):', tests=['tests/test_configs.py'], alone=True),
    mutation('architecture: a record resolved for loading passes as a run config', 'fmjax/configs.py',
             '  if known and (not known[1] or recorded) and known[0] == _fingerprint(config):',
             '  if known and known[0] == _fingerprint(config):', tests=['tests/test_configs.py'], alone=True),
    mutation("architecture: the autoencoder's _class_name ignored", 'fmjax/autoencoders/registry.py',
             "  name = fields.get('_class_name', DEFAULT_CLASS_NAME)\n",
             "  name = DEFAULT_CLASS_NAME\n", tests=['tests/test_autoencoder_registry.py'], alone=True),
    mutation('architecture: --mode=eval restores the latest step whatever restore_step says',
             'fmjax/cli/evaluate.py', 'restore_run(workdir, config.train.restore_step,',
             'restore_run(workdir, None,', tests=['tests/test_lifecycle.py'], alone=True),
    mutation('architecture: config.steer.method checked against the methods known at import',
             'fmjax/configs.py', '  known = tuple(_methods.METHODS)',
             "  known = ('best_of_n', 'guidance', 'smc')", tests=['tests/test_api_steer.py'], alone=True),
    mutation('architecture: the latent build ignores --register', 'fmjax/data/latents.py',
             '    for path in args.register:\n      run_registration_file(path)\n', '',
             tests=['tests/test_autoencoder_registry.py'], alone=True),
    mutation("architecture: a user file's error located at the importer's line", 'fmjax/user_files.py',
             'return f\'{path} line {lines[-1]}\' if lines else path', 'return path',
             tests=['tests/test_autoencoder_registry.py', 'tests/test_lifecycle_cli.py'], alone=True),
]
# The fused backward of attention's tangent (fmjax/models/flash_jvp_backward.py), one term each.
# The kernel-level tests (the end-to-end and reference-checking ones add minutes, not coverage).
FLASH_BACKWARD_TESTS = ['tests/test_flash_jvp_backward.py::test_six_gradients_match_float64_formulas',
                        'tests/test_flash_jvp_backward.py::test_padded_keys_stay_masked_when_every_score_is_far_below_zero']
_FLASH_BACKWARD = 'fmjax/models/flash_jvp_backward.py'
FLASH_BACKWARD_MUTATIONS = [
    mutation('flash backward: H without - delta', _FLASH_BACKWARD,
             '+ _dot_t(g, dv) - delta)', '+ _dot_t(g, dv))',
             tests=FLASH_BACKWARD_TESTS, alone=True),
    mutation('flash backward: H without + B', _FLASH_BACKWARD,
             'ds_centered * a_centered + _dot_t(g, dv) - delta', 'ds_centered * a_centered - delta',
             tests=FLASH_BACKWARD_TESTS, alone=True),
    mutation('flash backward: dS centred by alpha instead of mu', _FLASH_BACKWARD,
             'ds_centered = ds - mu ', 'ds_centered = ds - alpha ',
             tests=FLASH_BACKWARD_TESTS, alone=True),
    mutation('flash backward: grad k without the E^T dq term', _FLASH_BACKWARD,
             'acc_k = acc_k + _dot(h.astype(q.dtype).T, q) + _dot(e.astype(dq.dtype).T, dq)',
             'acc_k = acc_k + _dot(h.astype(q.dtype).T, q)', tests=FLASH_BACKWARD_TESTS, alone=True),
    mutation('flash backward: grad q without the E dk term', _FLASH_BACKWARD,
             'acc_q = acc_q + _dot(h.astype(k.dtype), k) + _dot(e.astype(dk.dtype), dk)',
             'acc_q = acc_q + _dot(h.astype(k.dtype), k)', tests=FLASH_BACKWARD_TESTS, alone=True),
    mutation('flash backward: grad v from P instead of dP', _FLASH_BACKWARD,
             'acc_v = acc_v + _dot(dp.astype(g.dtype).T, g)', 'acc_v = acc_v + _dot(p.astype(g.dtype).T, g)',
             tests=FLASH_BACKWARD_TESTS, alone=True),
    mutation('flash backward: padded keys not masked', _FLASH_BACKWARD,
             '  if valid is not None:\n    s = jnp.where(valid, s, _MASKED)\n'
             '    ds = jnp.where(valid, ds, 0.0)\n', '',
             tests=FLASH_BACKWARD_TESTS, alone=True),
    mutation('flash backward: the key kernel skips the last query block', _FLASH_BACKWARD,
             'jax.lax.fori_loop(0, num_q_blocks, body', 'jax.lax.fori_loop(0, num_q_blocks - 1, body',
             tests=FLASH_BACKWARD_TESTS, alone=True),
]
MUTATIONS += STEERING_MUTATIONS + API_MUTATIONS + PLUMBING_MUTATIONS + LIFECYCLE_MUTATIONS + ARCHITECTURE_MUTATIONS
MUTATIONS += FLASH_BACKWARD_MUTATIONS
# This session's plumbing: deferred FID, the in-memory input pipeline, the classifier's restore,
# the backward kernels' own blocks.
SWEEP_TESTS = ['tests/test_sweep.py']
SESSION_MUTATIONS = [
    mutation('deferred FID: the sink gets every row, non-finite ones too', 'fmjax/evaluation/sweep.py',
             'images = to_rgb_uint8(local[finite], value_range)', 'images = to_rgb_uint8(local, value_range)',
             tests=SWEEP_TESTS, alone=True),
    mutation('deferred FID: labels not written with the images', 'fmjax/evaluation/sample_batches.py',
             '    if labels is not None:\n      self._labels.append', '    if False:\n      self._labels.append',
             tests=SWEEP_TESTS, alone=True),
    mutation("deferred FID: the sample batch's provenance is not checked", 'fmjax/evaluation/reference_batches.py',
             "                **info.get('provenance', {})}", '                }',
             tests=SWEEP_TESTS, alone=True),
    mutation('in-memory pipeline: examples stacked in another order', 'fmjax/data/datasets.py',
             "return StackedExamples({name: np.stack([np.asarray(v) for v in values])",
             "return StackedExamples({name: np.stack([np.asarray(v) for v in values][::-1])",
             tests=LATENT_TESTS, alone=True),
    mutation('classifier: restored without a target sharding', 'fmjax/steering/classifier.py',
             'abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), abstract)',
             'pass', tests=['tests/test_classifier.py'], alone=True),
    mutation("flash backward: the kernels take the forward's blocks", 'fmjax/models/attention.py',
             'block_q=opts.backward_block,\n                                           block_k=opts.backward_block,',
             'block_q=opts.block_q,\n                                           block_k=opts.block_k,',
             tests=['tests/test_flash_jvp_backward.py'], alone=True),
]
MUTATIONS += SESSION_MUTATIONS
# The TPU (Mosaic) backward of the tangent (fmjax/models/flash_jvp_backward_tpu.py), one term or
# step each; the tile's own terms are shared with the Triton kernels (FLASH_BACKWARD_MUTATIONS).
FLASH_BACKWARD_TPU_TESTS = ['tests/test_flash_jvp_backward_tpu.py']
_FLASH_BACKWARD_TPU = 'fmjax/models/flash_jvp_backward_tpu.py'
FLASH_BACKWARD_TPU_MUTATIONS = [
    mutation('TPU backward: grad k without the E^T dq term', _FLASH_BACKWARD_TPU,
             'acc_k[...] += _dot(h.T.astype(q.dtype), q) + _dot(e_t, dq)',
             'acc_k[...] += _dot(h.T.astype(q.dtype), q)', tests=FLASH_BACKWARD_TPU_TESTS, alone=True),
    mutation('TPU backward: grad dk from dq instead of q', _FLASH_BACKWARD_TPU,
             'acc_dk[...] += _dot(e_t, q)', 'acc_dk[...] += _dot(e_t, dq)',
             tests=FLASH_BACKWARD_TPU_TESTS, alone=True),
    mutation('TPU backward: grad v from P instead of dP', _FLASH_BACKWARD_TPU,
             'acc_v[...] += _dot(dp.T.astype(g.dtype), g)', 'acc_v[...] += _dot(p.T.astype(g.dtype), g)',
             tests=FLASH_BACKWARD_TPU_TESTS, alone=True),
    mutation('TPU backward: grad dv from dP instead of P', _FLASH_BACKWARD_TPU,
             'acc_dv[...] += _dot(p.T.astype(g.dtype), g)', 'acc_dv[...] += _dot(dp.T.astype(g.dtype), g)',
             tests=FLASH_BACKWARD_TPU_TESTS, alone=True),
    mutation('TPU backward: grad q without the E dk term', _FLASH_BACKWARD_TPU,
             'acc_q[...] += _dot(h.astype(k.dtype), k) + _dot(e, dk)',
             'acc_q[...] += _dot(h.astype(k.dtype), k)', tests=FLASH_BACKWARD_TPU_TESTS, alone=True),
    mutation('TPU backward: grad dq from dk instead of k', _FLASH_BACKWARD_TPU,
             'acc_dq[...] += _dot(e, k)', 'acc_dq[...] += _dot(e, dk)',
             tests=FLASH_BACKWARD_TPU_TESTS, alone=True),
    mutation('TPU backward: grad k and dk not scaled by 1/sqrt(d)', _FLASH_BACKWARD_TPU,
             'grad_k_ref[...] = (scale * acc_k[...])', 'grad_k_ref[...] = (acc_k[...])',
             tests=FLASH_BACKWARD_TPU_TESTS, alone=True),
    mutation('TPU backward: key accumulators not zeroed at the first query block', _FLASH_BACKWARD_TPU,
             '      acc[...] = jnp.zeros(acc.shape, jnp.float32)', '      pass',
             tests=FLASH_BACKWARD_TPU_TESTS, alone=True),
    mutation('TPU backward: padded keys not masked', _FLASH_BACKWARD_TPU,
             '  return keys < kv_len', '  return None', tests=FLASH_BACKWARD_TPU_TESTS, alone=True),
    mutation('TPU backward: alpha and delta swapped', _FLASH_BACKWARD_TPU,
             'for x in (lse, mu, row_statistic(g, o), row_statistic(g, do)))',
             'for x in (lse, mu, row_statistic(g, do), row_statistic(g, o)))',
             tests=FLASH_BACKWARD_TPU_TESTS, alone=True),
    mutation('TPU forward: mu written unnormalized (sum w dS instead of / l)', 'fmjax/models/flash_jvp_tpu.py',
             '      mu_ref[...] = mu', '      mu_ref[...] = c_ref[...]',
             tests=FLASH_BACKWARD_TPU_TESTS, alone=True),
    mutation("TPU backward: flash_attention(kernel='tpu') runs the Triton backward", 'fmjax/models/attention.py',
             "  if opts.kernel == 'tpu':\n    from fmjax.models import flash_jvp_backward_tpu",
             "  if False:\n    from fmjax.models import flash_jvp_backward_tpu",
             tests=FLASH_BACKWARD_TPU_TESTS, alone=True),
]
MUTATIONS += FLASH_BACKWARD_TPU_MUTATIONS
# A distillation teacher under classifier-free guidance (config.teacher.guidance_scale).
GUIDED_TEACHER_TESTS = ['tests/test_train_teacher.py']
GUIDED_TEACHER_MUTATIONS = [
    mutation('guided teacher: the scale not applied', 'fmjax/samplers.py',
             'return classifier_free_guidance(fn, labels, null_label, guidance_scale, guidance_input=guidance_input,',
             'return classifier_free_guidance(fn, labels, null_label, 1.0, guidance_input=guidance_input,',
             tests=GUIDED_TEACHER_TESTS, alone=True),
    mutation('guided teacher: the last class taken for the null label', 'fmjax/trained_runs.py',
             'return samplers.guided(velocity, teacher.num_classes, scale,',
             'return samplers.guided(velocity, teacher.num_classes - 1, scale,',
             tests=GUIDED_TEACHER_TESTS, alone=True),
    mutation('guided teacher: load_teacher ignores the scale', 'fmjax/trained_runs.py',
             '  if scale != 1.0:\n    velocity = _guided_velocity', '  if False:\n    velocity = _guided_velocity',
             tests=GUIDED_TEACHER_TESTS, alone=True),
    mutation('guided teacher: a teacher without label dropout accepted', 'fmjax/trained_runs.py',
             "  if not guidance_input and not teacher.config.loss.get('label_dropout'):",
             "  if False:", tests=GUIDED_TEACHER_TESTS, alone=True),
]
MUTATIONS += GUIDED_TEACHER_MUTATIONS
# Scanned DiT blocks (config.model.scan_blocks: stacked parameters, one lax.scan).
SCAN_TESTS = ['tests/test_scan_blocks.py']
_SCAN = '(layer(state, h, c), None), h, state)'
SCAN_MUTATIONS = [
    mutation('scanned blocks: one layer reused for every block', 'fmjax/models/dit.py', _SCAN,
             '(layer(state, h, c), None), h, jax.tree.map(lambda a: jnp.broadcast_to(a[:1], a.shape), state))',
             tests=SCAN_TESTS, alone=True),
    mutation('scanned blocks: run in reverse order', 'fmjax/models/dit.py', _SCAN,
             '(layer(state, h, c), None), h, state, reverse=True)', tests=SCAN_TESTS, alone=True),
    mutation('scanned blocks: a stop-gradient on the layer parameters', 'fmjax/models/dit.py', _SCAN,
             '(layer(jax.lax.stop_gradient(state), h, c), None), h, state)', tests=SCAN_TESTS, alone=True),
    mutation('scanned blocks: remat ignored inside the scan', 'fmjax/models/dit.py',
             '  if policy is not None:\n    layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)',
             '  if False:\n    layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)',
             tests=SCAN_TESTS, alone=True),
    mutation('scanned blocks: FLOPs counted for one block', 'fmjax/models/flops.py',
             '[module.blocks] * module.depth', '[module.blocks]', tests=SCAN_TESTS, alone=True),
    mutation('scanned blocks: initialized in another order than unrolled', 'fmjax/models/dit.py',
             'self.blocks = stack_modules(blocks) if', 'self.blocks = stack_modules(blocks[::-1]) if',
             tests=SCAN_TESTS, alone=True),
    mutation('scanned blocks: the parameter conversion stacks in reverse', 'fmjax/models/dit.py',
             'for i in range(depth)]\n  return {**params', 'for i in reversed(range(depth))]\n  return {**params',
             tests=SCAN_TESTS, alone=True),
    mutation('scanned blocks: fine-tuning from a base of the other layout not converted',
             'fmjax/from_config.py', 'for convert in (lambda params: params, _block_layout_of(expected, base.params)):',
             'for convert in (lambda params: params,):', tests=SCAN_TESTS, alone=True),
    mutation('scanned blocks: fine-tuning initialized without the conversion', 'fmjax/train.py',
             'lambda _: self.base_layout(base_params)', 'lambda _: base_params', tests=SCAN_TESTS, alone=True),
]
MUTATIONS += SCAN_MUTATIONS

REMAT_TESTS = ['tests/test_remat.py']
REMAT_MUTATIONS = [
    mutation('remat: the DiT blocks run without a checkpoint', 'fmjax/models/dit.py',
             'call = block_caller(self.remat)', "call = block_caller('none')", tests=REMAT_TESTS, alone=True),
    mutation('remat: the U-Net blocks run without a checkpoint', 'fmjax/models/unet.py',
             'call = block_caller(self.remat)', "call = block_caller('none')", tests=REMAT_TESTS, alone=True),
    mutation("remat: 'dots' keeps no convolution outputs", 'fmjax/models/remat.py',
             'return (prim is jax.lax.conv_general_dilated_p\n', 'return (False\n', tests=REMAT_TESTS, alone=True),
    mutation('remat: a stop-gradient on the block parameters in the checkpoint', 'fmjax/models/remat.py',
             'policy=policy)(state, *inputs)', 'policy=policy)(jax.lax.stop_gradient(state), *inputs)',
             tests=REMAT_TESTS, alone=True),
]
MUTATIONS += REMAT_MUTATIONS


def run(mutation: Mutation, scratch: str) -> list[str]:
  """Applies one mutation to a fresh copy and returns the ids of the tests that fail."""
  shutil.rmtree(scratch, ignore_errors=True)
  shutil.copytree(ROOT, scratch, ignore=shutil.ignore_patterns('.git', '.venv', 'runs', '__pycache__'))
  path = os.path.join(scratch, mutation.path)
  with open(path) as f:
    source = f.read()
  for old, new in mutation.edits:
    if source.count(old) != 1:
      raise SystemExit(f'{mutation.name}: the snippet {old!r} occurs {source.count(old)} times in '
                       f'{mutation.path}; update tools/mutations.py to the current code.')
    source = source.replace(old, new)
  with open(path, 'w') as f:
    f.write(source)
  result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-n', '2', '-p', 'no:cacheprovider',
                           *(() if mutation.alone else TESTS), *mutation.tests], cwd=scratch, capture_output=True, text=True,
                          env={**os.environ, 'PYTHONPATH': scratch})
  return re.findall(r'^(?:FAILED|ERROR) (\S+)', result.stdout, re.MULTILINE)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--scratch', default='/tmp/mut')
  parser.add_argument('--only', nargs='*', help='run only the mutations whose name contains one of these')
  args = parser.parse_args()
  survivors = 0
  for mutation in MUTATIONS:
    if args.only and not any(word in mutation.name for word in args.only):
      continue
    failed = run(mutation, args.scratch)
    survivors += not failed
    shown = ', '.join(name.split('::')[-1] for name in failed[:3]) + (' ...' if len(failed) > 3 else '')
    print(f'{mutation.name} | {mutation.path} | {len(failed)} failed: {shown or "NONE (survived)"}',
          flush=True)
  shutil.rmtree(args.scratch, ignore_errors=True)
  sys.exit(1 if survivors else 0)


if __name__ == '__main__':
  main()
