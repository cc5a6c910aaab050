r"""Reward fine-tuning on a toy mixture: reward gained vs distance to the exact tilted target.

  PYTHONPATH=. python benchmarks/finetune_toy.py [--base_steps 2000] [--finetune_steps 1000]
      [--eval_steps 0,25,50,100,250,500,1000,2000] [--num_samples 2000] [--out runs/finetune_toy]

Base: a flow map trained by LSD (the training system, `train.train_and_evaluate`) on the
2-mode mixture 0.5 N((-2, 0), 0.5^2 I) + 0.5 N((2, 0), 0.5^2 I). Reward r(x) = -|x - c|^2 /
(2 * 1.5^2), c = (2, 1), temperature lambda = 1: the exact tilted target q
(fmjax.steering.tilted) puts 0.96 of the mass on the right mode (mass must move between modes)
and shifts / narrows it. Each method fine-tunes the base with the same sharded train step the
CLI uses (train.Setup; rules 'reward_distill' and 'reward_backprop', config.finetune) and is
evaluated at --eval_steps on its own `--steps`-step sampler: mean reward, energy
distance to exact draws of q, and the mass error max_k |m_k - w'_k| (mode_masses). The base
row (step 0) and two floors are printed: the base model against the untilted target p (its own
error), and two exact draws of q (the sampling-noise floor of the energy distance).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import api, benchmarking, configs, samplers, train
from fmjax import sharding as sharding_lib
from fmjax.data import toy
from fmjax.evaluation import toy_metrics
from fmjax.steering import rewards, tilted

MEANS = ((-2.0, 0.0), (2.0, 0.0))
STDS, WEIGHTS = (0.5, 0.5), (1.0, 1.0)
CENTER, REWARD_STD, TEMPERATURE = (2.0, 1.0), 1.5, 1.0


def base_config(args):
  c = configs.base_config()
  c.data.name = 'gmm'
  c.data.means, c.data.stds, c.data.weights = MEANS, STDS, WEIGHTS
  c.loss.name = 'lsd'
  c.model.hidden, c.model.depth, c.model.time_dim = args.hidden, 3, 32
  c.train.num_steps = args.base_steps
  c.train.batch_size = args.batch_size
  c.train.log_every = max(args.base_steps // 4, 1)
  c.train.checkpoint_every = 0
  c.optim.schedule = 'cosine'
  c.optim.ema_decays = (0.999,)
  c.eval.at_end = False
  return c


def finetune_config(args, base_dir, rule, regularization=1.0):
  c = base_config(args)
  c.loss.name = rule
  c.teacher.workdir = base_dir
  c.finetune.reward, c.finetune.center, c.finetune.std = 'quadratic', CENTER, REWARD_STD
  c.finetune.temperature = TEMPERATURE
  c.finetune.steps = args.steps
  c.finetune.regularization = regularization
  c.train.num_steps = args.finetune_steps
  c.optim.learning_rate = args.learning_rate
  c.optim.schedule = 'constant'
  c.optim.warmup_steps = 0
  return c


def evaluate(sample, params, z, reward, q, q_draws):
  x = np.asarray(sample(params, z))
  masses = tilted.mode_masses(q, x)
  return {'reward': float(np.mean(reward(jnp.asarray(x)))),
          'energy_distance': float(toy_metrics.energy_distance(jnp.asarray(x), q_draws)),
          'mass_error': float(np.max(np.abs(masses - np.asarray(q.weights)))),
          'right_mode_mass': float(masses[1])}


def finetune_run(config, workdir, args, z, reward, q, q_draws):
  setup = train.Setup(config, workdir)
  sample = jax.jit(lambda p, x: samplers.flow_map_sample(setup.flow_map, p, x, num_steps=args.steps))
  rows = []
  with jax.set_mesh(setup.mesh):
    state = setup.init_state()
    no_stop = sharding_lib.per_device_flags(False, setup.mesh)
    start = time.time()
    eval_steps = {int(k) for k in args.eval_steps.split(',')} | {args.finetune_steps}
    for step in range(args.finetune_steps + 1):
      if step in eval_steps:
        rows.append({'step': step, **evaluate(sample, state['params']['net'], z, reward, q, q_draws)})
        print(config.loss.name, rows[-1], f'{time.time() - start:.0f}s', flush=True)
      if step < args.finetune_steps:
        state, _ = setup.train_step(state, setup.source.batch(step), no_stop)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--base_steps', type=int, default=2000)
  parser.add_argument('--finetune_steps', type=int, default=1000)
  parser.add_argument('--eval_steps', type=str, default='0,25,50,100,250,500,1000,2000',
                      help='fine-tuning steps at which to evaluate (comma-separated)')
  parser.add_argument('--num_samples', type=int, default=2000)
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--hidden', type=int, default=128)
  parser.add_argument('--steps', type=int, default=1, help='sampler steps (base and fine-tuned)')
  parser.add_argument('--learning_rate', type=float, default=3e-4)
  parser.add_argument('--regularizations', type=str, default='1.0,0.1',
                      help='reward_backprop rho values (comma-separated)')
  parser.add_argument('--out', type=str, default='runs/finetune_toy')
  args = parser.parse_args()

  os.makedirs(args.out, exist_ok=True)
  base_dir = os.path.join(args.out, 'base')
  p = toy.GaussianMixtureTarget(np.array(MEANS), np.array(STDS), np.array(WEIGHTS))
  q = tilted.tilt_gaussian_mixture(p, CENTER, REWARD_STD, TEMPERATURE)
  reward = rewards.quadratic(jnp.asarray(CENTER), REWARD_STD)
  key_z, key_q, key_q2, key_p = jax.random.split(jax.random.PRNGKey(2026), 4)
  z = jax.random.normal(key_z, (args.num_samples, 2))
  q_draws = q.sample(key_q, args.num_samples)
  if not os.path.isdir(os.path.join(base_dir, 'checkpoints')):
    train.train_and_evaluate(base_config(args), base_dir)

  results = {'setup': vars(args), 'q_weights': np.asarray(q.weights).tolist(),
             'q_mean_reward': float(np.mean(reward(q_draws))),
             'p_mean_reward': float(np.mean(reward(p.sample(key_p, args.num_samples)))),
             'floor_two_exact_q_draws': float(toy_metrics.energy_distance(q.sample(key_q2, args.num_samples), q_draws)),
             'runs': {}}
  methods = [('reward_distill', 'reward_distill', 1.0)]
  methods += [(f'reward_backprop rho={r}', 'reward_backprop', float(r)) for r in args.regularizations.split(',')]
  for label, rule, rho in methods:
    config = finetune_config(args, base_dir, rule, rho)
    results['runs'][label] = finetune_run(config, os.path.join(args.out, label.replace(' ', '_')),
                                          args, z, reward, q, q_draws)
  # The base model's own error: its samples against exact draws of the untilted target p.
  base_x = api.load(base_dir).sample(jax.random.PRNGKey(7), args.num_samples, steps=args.steps)
  results['base_vs_p_energy_distance'] = float(toy_metrics.energy_distance(
      jnp.asarray(base_x), p.sample(key_p, args.num_samples)))
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)
  print_table(results)


def print_table(results):
  print(f"\nexact q: mean reward {results['q_mean_reward']:.3f}, right-mode mass "
        f"{results['q_weights'][1]:.3f}; base law p: mean reward {results['p_mean_reward']:.3f}; "
        f"energy-distance floor (two exact q draws) {results['floor_two_exact_q_draws']:.4f}; "
        f"base model vs p {results['base_vs_p_energy_distance']:.4f}\n")
  cells = [[label, r['step'], f"{r['reward']:.3f}", f"{r['energy_distance']:.4f}",
            f"{r['right_mode_mass']:.3f}", f"{r['mass_error']:.3f}"]
           for label, rows in results['runs'].items() for r in rows]
  print(benchmarking.markdown_table(['method', 'step', 'mean reward', 'energy distance to q',
                                     'right-mode mass', 'mass error'], cells))


if __name__ == '__main__':
  main()
