r"""Steering methods side by side on toy targets with exact tilted answers (docs/steering.md's tables).

For a trained 2-D toy flow map (experiments/toy_gmm.py: 8 Gaussians on a ring of radius 4, std
0.4) and three tilts, every method runs at (about) equal network evaluations per returned sample
(NFE, default budget 16) and is compared with the exact tilted law:
  within:  r = -|x|^2 / (2 * 3^2), lambda = 1: every mode shifts toward the origin, the mode
           masses stay 1/8 (mass moves within modes only);
  between: r = -|x - (4, 0)|^2 / (2 * 4^2), lambda = 1: the modes keep their shapes nearly,
           their masses change strongly (mass must move between modes);
  ring:    r = -x_0^2 1[x_0 < 0], lambda = 1 (the one-sided reward of arXiv 2511.22688's toy
           experiment; that paper's temperature and sample counts not checked): no closed form,
           the fraction with x_0 > 0 and the mean reward are reported.
Methods: plain samples (1 NFE; energy distance to the untilted target as the goal's reference),
best-of-N and importance resampling of N one-step samples (N = budget), SMC (fmjax.steering.smc)
with the flow-map, denoiser and naive look-aheads at the largest step count within the budget,
and look-ahead gradient guidance (fmjax.steering.reward_guidance).

Run (trains the toy model first when WORKDIR has no checkpoint):
  python benchmarks/steering_toy.py --workdir=runs/steer_gmm --train_steps=3000 --num=4096
  python benchmarks/steering_toy.py --exact --num=1024        # exact maps (no training; CPU)
  python benchmarks/steering_toy.py --workdir=/tmp/tiny --train_steps=50 --num=256  # smoke
Writes a markdown table to stdout and JSON to --out (default WORKDIR/steer_bench.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fmjax import benchmarking, interpolants  # noqa: E402
from fmjax.data.toy import GaussianMixtureTarget  # noqa: E402
from fmjax.evaluation.toy_metrics import energy_distance  # noqa: E402
from fmjax.steering import lookahead as lookahead_lib  # noqa: E402
from fmjax.steering import reward_guidance, rewards, smc, tilted  # noqa: E402

RING = GaussianMixtureTarget(
    np.array([[4 * np.cos(2 * np.pi * k / 8), 4 * np.sin(2 * np.pi * k / 8)] for k in range(8)]),
    np.full(8, 0.4), np.ones(8), ode_steps=32)


def cases():
  """(name, reward, temperature, exact tilted mixture or None)."""
  out = []
  for name, center, std in (('within', np.zeros(2), 3.0), ('between', np.array([4.0, 0.0]), 4.0)):
    out.append((name, rewards.quadratic(center, std), 1.0,
                tilted.tilt_gaussian_mixture(RING, center, std, 1.0)))
  out.append(('ring', rewards.one_sided_quadratic(0), 1.0, None))
  return out


def ensure_trained(workdir: str, steps: int) -> None:
  if os.path.isdir(os.path.join(workdir, 'checkpoints')) or os.path.isdir(workdir) and any(
      f.isdigit() for f in os.listdir(workdir)):
    return
  cmd = [sys.executable, '-m', 'fmjax.main', '--config=experiments/toy_gmm.py:lsd',
         f'--workdir={workdir}', f'--config.train.num_steps={steps}',
         f'--config.train.checkpoint_every={steps}', f'--config.train.log_every={max(steps // 4, 1)}']
  print('training:', ' '.join(cmd), file=sys.stderr)
  subprocess.run(cmd, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def model_maps(workdir: str):
  """(flow_map, velocity, interpolant) of a trained workdir, as pure closures of its params."""
  import fmjax
  from fmjax import from_config
  model = fmjax.load(workdir)
  fm, params = model.parameterization, model.params
  times = lambda t, x: jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
  flow_map = lambda s, t, x, labels=None: fm.X(params, times(s, x), times(t, x), x, labels)
  velocity = lambda t, x, labels=None: fm.velocity(params, times(t, x), x, labels)
  return flow_map, velocity, from_config.build_interpolant(model.config)


def exact_maps():
  ip = interpolants.linear()
  return (lambda s, t, x, labels=None: RING.flow_map(ip, s, t, x),
          lambda t, x, labels=None: RING.velocity(ip, t, x), ip)


def metrics(x, reward, q, key):
  x = np.asarray(x)
  row = {'mean_reward': float(jnp.mean(reward(jnp.asarray(x)))), 'frac_x0_pos': float(np.mean(x[:, 0] > 0))}
  if q is not None:
    ref = q.sample(key, x.shape[0])
    row['energy'] = float(energy_distance(jnp.asarray(x), ref))
    row['mass_err'] = float(np.abs(tilted.mode_masses(q, x) - q.weights).sum())   # L1 over modes
  return row


def run(args):
  if args.exact:
    flow_map, velocity, ip = exact_maps()
    label = 'exact maps of the 8-Gaussian ring'
  else:
    ensure_trained(args.workdir, args.train_steps)
    flow_map, velocity, ip = model_maps(args.workdir)
    label = f'trained lsd toy_gmm model in {args.workdir}'
  num, budget, particles = args.num, args.budget, args.particles
  key = jax.random.PRNGKey(args.seed)
  one_step = jax.jit(lambda x0: flow_map(0.0, 1.0, x0))
  x0 = jax.random.normal(key, (num, 2))
  plain = one_step(x0)
  floor_p = float(energy_distance(RING.sample(jax.random.PRNGKey(1), num), RING.sample(jax.random.PRNGKey(2), num)))
  plain_p = float(energy_distance(plain, RING.sample(jax.random.PRNGKey(1), num)))
  results = {'setup': label, 'num': num, 'budget_nfe': budget, 'particles': particles,
             'plain_energy_to_untilted': plain_p, 'floor_untilted': floor_p, 'cases': {}}
  for name, reward, lam, q in cases():
    rows = {}
    ref_key = jax.random.PRNGKey(100)
    if q is not None:
      rows['exact draw (floor)'] = {**metrics(q.sample(jax.random.PRNGKey(101), num), reward, q, ref_key), 'nfe': 0}
    else:
      # No closed form: self-normalized importance weights exp(r / lambda) on 2^20 exact draws.
      big = RING.sample(jax.random.PRNGKey(102), 1 << 20)
      wts = jax.nn.softmax(reward(big) / lam)
      rows['exact (importance weights, 2^20 draws)'] = {
          'mean_reward': float(wts @ reward(big)), 'frac_x0_pos': float(wts @ (big[:, 0] > 0)), 'nfe': 0}
    rows['plain'] = {**metrics(plain, reward, q, ref_key), 'nfe': 1}
    # N one-step samples per output: best-of-N (argmax) and importance resampling (categorical).
    cand = one_step(jax.random.normal(jax.random.fold_in(key, 1), (num * budget, 2))).reshape(num, budget, 2)
    score = reward(cand.reshape(-1, 2)).reshape(num, budget) / lam
    best = cand[jnp.arange(num), jnp.argmax(score, 1)]
    pick = jax.random.categorical(jax.random.fold_in(key, 2), score, axis=1)
    w = jax.nn.softmax(score, 1)
    rows[f'best-of-{budget}'] = {**metrics(best, reward, q, ref_key), 'nfe': budget}
    rows[f'importance resampling, N={budget}'] = {
        **metrics(cand[jnp.arange(num), pick], reward, q, ref_key), 'nfe': budget,
        'ess': float(jnp.mean(1.0 / jnp.sum(w**2, 1)) / budget)}
    for look in lookahead_lib.LOOKAHEADS:
      steps = max((k for k in range(1, 65) if smc.smc_nfe(k, lookahead=look, noise=args.noise,
                                                          interpolant=ip) <= budget), default=1)
      t0 = time.time()
      sample = jax.jit(lambda k, x: smc.smc(
          k, x, flow_map=flow_map, velocity=velocity, interpolant=ip, reward=reward,
          temperature=lam, num_steps=steps, num_particles=particles, lookahead=look,
          noise=args.noise))
      out = sample(jax.random.fold_in(key, 3), x0)
      jax.block_until_ready(out.samples)
      rows[f'SMC, {look} look-ahead, {steps} steps'] = {
          **metrics(out.samples, reward, q, ref_key), 'nfe': int(out.nfe),
          'ess': float(out.ess[-1]), 'seconds': time.time() - t0}
    for look in lookahead_lib.LOOKAHEADS:
      grid = lambda k: tuple(np.linspace(0.0, 1.0, k + 1).tolist())
      steps = max((k for k in range(1, 65)
                   if reward_guidance.guided_nfe(grid(k), ip, lookahead=look) <= budget), default=1)
      sample = jax.jit(lambda x, look=look, steps=steps: reward_guidance.guided_sample(
          x, flow_map=flow_map, velocity=velocity, interpolant=ip, reward=reward,
          temperature=lam, times=grid(steps), lookahead=look))
      res = sample(x0)
      rows[f'guidance, {look} look-ahead, {steps} steps'] = {
          **metrics(res.samples, reward, q, ref_key), 'nfe': int(res.nfe)}
    results['cases'][name] = rows
  return results


def markdown(results) -> str:
  lines = [f"Setup: {results['setup']}; {results['num']} samples per method, NFE budget "
           f"{results['budget_nfe']} per sample, SMC groups of {results['particles']} particles.",
           f"Plain one-step samples vs the untilted target: energy distance "
           f"{results['plain_energy_to_untilted']:.4f} (two exact draws: {results['floor_untilted']:.4f}).", '']
  header = ['method', 'NFE', 'energy dist.', 'mode-mass L1 err', 'mean reward', 'frac x0>0', 'ESS']
  for name, rows in results['cases'].items():
    cells = []
    for method, r in rows.items():
      if 'error' in r:
        cells.append([method, '', r['error'], '', '', '', ''])
        continue
      f = lambda k, fmt='{:.4f}': fmt.format(r[k]) if k in r else '-'
      cells.append([method, r['nfe'], f('energy'), f('mass_err', '{:.3f}'), f('mean_reward', '{:.3f}'),
                    f('frac_x0_pos', '{:.3f}'), f('ess', '{:.2f}')])
    lines += [f'### {name}', '', benchmarking.markdown_table(header, cells), '']
  return '\n'.join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--workdir', default='runs/steer_gmm')
  p.add_argument('--train_steps', type=int, default=3000)
  p.add_argument('--exact', action='store_true', help='use the exact maps instead of a model')
  p.add_argument('--num', type=int, default=4096)
  p.add_argument('--budget', type=int, default=16)
  p.add_argument('--particles', type=int, default=256)
  p.add_argument('--noise', type=float, default=0.5)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default=None)
  args = p.parse_args()
  if args.num % args.particles:
    p.error(f'--num ({args.num}) must be a multiple of --particles ({args.particles}).')
  results = run(args)
  text = markdown(results)
  print(text)
  out = args.out or os.path.join(args.workdir if not args.exact else '.', 'steer_bench.json')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'w') as f:
    json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
