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
    # iMF with guidance inputs (issue 9): tests/test_reference_imf.py's finite-difference reference.
    mutation("iMF guided target (1 - 1/omega) replaced by CFG's (omega - 1)", 'fmjax/losses/imf.py',
             'expand(1.0 - 1.0 / omega, v_c) * (v_c - v_u)', 'expand(omega - 1.0, v_c) * (v_c - v_u)',
             tests=('tests/test_reference_imf.py',)),
    mutation('iMF guidance scale drawn uniformly instead of log-uniformly', 'fmjax/losses/imf.py',
             'return jnp.exp(u * jnp.log(omega_max))', 'return 1.0 + u * (omega_max - 1.0)',
             tests=('tests/test_reference_imf.py',)),
    # iMF's two heads from one trunk pass (issue 11): the reference test and the FLOP count.
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
    mutation("a run accepts another VAE's latents", 'fmjax/build.py',
             "  if latent_info['autoencoder_digest'] != autoencoder.digest:",
             "  if False:", tests=DECODE_TESTS, alone=True),
]

# Mistakes outside the loss rules, each caught by tests at non-degenerate settings (temperature
# != 1, decay != 0.5, std != 1, class-conditional models with labels, several groups).
# Steering maths (fmjax/steering/).
STEERING_MUTATIONS = [
]
# The sampling API and the steer mode (fmjax/api.py, fmjax/steer_mode.py).
API_MUTATIONS = [
]
# Evaluation plumbing, time samplers, row drawing, data pipelines, sharding.
PLUMBING_MUTATIONS = [
]
# The run lifecycle: CLI, configs, checkpoints, the training loop and its EMA.
LIFECYCLE_MUTATIONS = [
]
MUTATIONS += STEERING_MUTATIONS + API_MUTATIONS + PLUMBING_MUTATIONS + LIFECYCLE_MUTATIONS


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
