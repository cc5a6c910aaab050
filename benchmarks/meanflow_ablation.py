"""Why MeanFlow's one-step map trails LSD's on the n-D Gaussian mixtures: an ablation.

Every variant trains the same network with the same budget on the same random 8-component
mixture (`experiments/toy_gmm_nd.py` at DIM dimensions: 512 x 4 MLP, batch 512, 5,000 updates,
cosine schedule, EMA 0.999) and is scored by the trainer's own few-step evaluation (energy
distance and sliced W1 of 2,000 samples to 2,000 target draws; RMSE against the exact map
X*_{0,1} of the same noise). The variants change one of MeanFlow's choices at a time:

  weighting    the paper's adaptive weight 1 / (|err|^2 + c) (p = 1, c = 0.01) or none
  times        MeanFlow's logit-normal pairs (-0.4, 1.0 in its time) or uniform pairs (LSD's)
  diagonal     the share of r = t rows (0.75 by default; iMF uses 0.5) and how their time is drawn
  tangent      the conditional velocity x1 - x0 (MeanFlow) or the mixture's exact velocity
               b_t(x) (a noiseless tangent and target: the variance of the regression target
               removed, everything else kept)

and iMF (the model's own velocity as the tangent) with its defaults, weighted and unweighted, and
ESD (Eulerian self-distillation: the Eulerian residual of MeanFlow with the model's own velocity
as the tangent and target, LSD's times and weights) to separate the Eulerian objective from
MeanFlow's other choices.

  PYTHONPATH=. python benchmarks/meanflow_ablation.py                        # the table in docs/results.md
  PYTHONPATH=. python benchmarks/meanflow_ablation.py --only lsd,mf_paper --seeds 0,1,2
  PYTHONPATH=. python benchmarks/meanflow_ablation.py --steps 200 --workdir /tmp/mfa   # smoke run

Each run's workdir is kept (WORKDIR/NAME_seedS); a run whose final_metrics.json exists is read,
not retrained, so a stopped table continues where it ended.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from experiments import toy_gmm_nd
from fmjax import benchmarking, from_config, train
from fmjax.data import pipelines

UNIFORM = {'name': 'uniform'}
MEANFLOW_TIMES = {'name': 'logit_normal', 'mean': 0.4, 'std': 1.0}   # (-0.4, 1.0) in MeanFlow's time

# name -> (rule, config.loss overrides, exact tangent?)
VARIANTS = {
    'lsd': ('lsd', {}, False),
    'mf_paper': ('meanflow', {'weighting': 'adaptive'}, False),
    'mf_unweighted': ('meanflow', {'weighting': 'none'}, False),
    'mf_uniform_times': ('meanflow', {'weighting': 'adaptive', 'times': UNIFORM}, False),
    'mf_diagonal_0.5': ('meanflow', {'weighting': 'adaptive', 'diagonal_fraction': 0.5}, False),
    'mf_diagonal_uniform': ('meanflow', {'weighting': 'adaptive', 'diagonal_time': 'diagonal_times',
                                         'diagonal_times': UNIFORM}, False),
    'mf_exact_tangent': ('meanflow', {'weighting': 'adaptive'}, True),
    'mf_lsd_settings': ('meanflow', {'weighting': 'none', 'times': UNIFORM,
                                     'diagonal_time': 'diagonal_times', 'diagonal_times': UNIFORM}, False),
    'mf_lsd_settings_exact': ('meanflow', {'weighting': 'none', 'times': UNIFORM,
                                           'diagonal_time': 'diagonal_times',
                                           'diagonal_times': UNIFORM}, True),
    'esd': ('esd', {}, False),
    'imf_paper': ('imf', {'weighting': 'adaptive'}, False),
    'imf_unweighted': ('imf', {'weighting': 'none'}, False),
}


def make_config(rule: str, overrides: dict, dim: int, seed: int, steps: int | None):
  config = toy_gmm_nd.get_config(f'{rule},{dim}')
  for key, value in overrides.items():
    config.loss[key] = value
  config.seed = seed
  if steps:
    config.train.num_steps = steps
    config.optim.warmup_steps = min(config.optim.warmup_steps, steps // 4)
  config.train.checkpoint_every = 0
  return config


def exact_velocity(config):
  """The mixture's closed-form velocity b_t(x) as a teacher(t, x, labels)."""
  target = pipelines.make_toy_target(config.data)
  interpolant = from_config.build_interpolant(config)
  return lambda t, x, labels=None: target.velocity(interpolant, t, x)


def run(name: str, dim: int, seed: int, steps: int | None, workdir: str) -> tuple[dict, float]:
  rule, overrides, exact = VARIANTS[name]
  out = os.path.join(workdir, f'{name}_seed{seed}')
  done = os.path.join(out, 'final_metrics.json')
  if os.path.exists(done):
    with open(done) as f:
      return json.load(f), float('nan')
  config = make_config(rule, overrides, dim, seed, steps)
  start = time.time()
  metrics = train.train_and_evaluate(config, out, teacher=exact_velocity(config) if exact else None)
  return metrics, time.time() - start


def energy(metrics: dict, steps: int) -> float:
  return float(metrics['few_step'][str(steps)]['energy_distance'])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dim', type=int, default=5)
  parser.add_argument('--seeds', default='0', help='training seeds (config.seed), comma-separated')
  parser.add_argument('--only', default='', help='comma-separated variant names (default: all)')
  parser.add_argument('--steps', type=int, default=None, help='updates per run (default: the experiment\'s 5,000)')
  parser.add_argument('--workdir', default='runs/meanflow_ablation')
  args = parser.parse_args()
  names = args.only.split(',') if args.only else list(VARIANTS)
  unknown = sorted(set(names) - set(VARIANTS))
  if unknown:
    parser.error(f'unknown variants {unknown}; choose from {list(VARIANTS)}')
  seeds = [int(s) for s in args.seeds.split(',')]
  results = {}
  for name in names:
    for seed in seeds:
      metrics, seconds = run(name, args.dim, seed, args.steps, args.workdir)
      results[(name, seed)] = metrics
      print(f'{name} seed {seed}: 1-step energy {energy(metrics, 1):.4g} ({seconds:.0f} s)', flush=True)
  print(f'\n{args.dim}-D mixture, {len(seeds)} seed(s) per row; floor (two target draws): energy '
        f"{results[(names[0], seeds[0])]['target_vs_target']['energy_distance']:.2g}")
  rows = []
  for name in names:
    row = [name]
    for k in (1, 2, 4):
      row.append(' / '.join(f'{energy(results[(name, s)], k):.4f}' for s in seeds))
    for field, digits in (('sliced_wasserstein', 3), ('rmse_vs_exact', 3)):
      row.append(' / '.join(f"{results[(name, s)]['few_step']['1'][field]:.{digits}f}" for s in seeds))
    rows.append(row)
  print(benchmarking.markdown_table(['variant', '1-step energy', '2-step energy', '4-step energy',
                                     '1-step sliced W1', '1-step RMSE vs exact'], rows))


if __name__ == '__main__':
  main()
