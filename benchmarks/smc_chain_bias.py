"""How far SMC's target (the discrete chain's tilted law) is from the tilted law q itself.

SMC (fmjax.steering.smc) reweights the path law of its discrete chain (flow-map jump + one
Langevin step per grid step), so it samples that chain's x_1-marginal tilted by exp(r / lambda).
With exact maps the jump is exact, but one Langevin step of size eps h with the exact score
leaves the variance sigma_t^2 (1 + a^2), a = h eps / sigma_t^2, instead of sigma_t^2: a bias
of order noise^2 / steps that no number of particles removes (the weights correct the drift, not
the chain). This script measures it on N(m, diag s^2) with the exact flow map and velocity at
lambda = 0.37: the relative error of the second moment E[x_0^2] of the weighted particles
against the closed-form tilted Gaussian, with its standard error (spread over groups), beside
the error the closed-form law of the chain predicts, for several step counts and noise levels,
and for the three look-aheads at one setting.

  PYTHONPATH=. python benchmarks/smc_chain_bias.py              # the table in docs/steering.md
  PYTHONPATH=. python benchmarks/smc_chain_bias.py --groups=64   # quicker, wider error bars
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import benchmarking, interpolants
from fmjax.data.toy import GaussianTarget
from fmjax.steering import rewards, smc

LINEAR = interpolants.linear()
MEAN, STD = np.array([0.5, -1.0]), np.array([0.7, 1.3])
CENTER, REWARD_STD, LAM = np.array([1.5, 0.5]), 1.2, 0.37


def sigma(t):
  return np.sqrt((1 - t) ** 2 + (t * STD) ** 2)


def chain_variance(steps, noise):
  """Per-dimension variance of x_1 under the unguided flow-map chain (affine recursion)."""
  grid = np.linspace(0.0, 1.0, steps + 1)
  var = np.ones(2)
  for t, t2 in zip(grid[:-1], grid[1:]):
    var = var * (sigma(t2) / sigma(t)) ** 2
    eps = noise * (1 - t2) ** 2
    if eps > 0 and t2 < 1:
      a = (t2 - t) * eps / sigma(t2) ** 2
      var = (1 - a) ** 2 * var + 2 * eps * (t2 - t)
  return var


def tilted_second_moment(var):
  tau = REWARD_STD**2 * LAM
  new_var = 1 / (1 / var + 1 / tau)
  new_mean = new_var * (MEAN / var + CENTER / tau)
  return new_mean**2 + new_var


def measure(steps, noise, lookahead, groups, particles, seed):
  target = GaussianTarget(jnp.asarray(MEAN, jnp.float32), jnp.asarray(STD, jnp.float32))
  fm = lambda s, t, x, labels=None: target.flow_map(LINEAR, s, t, x)
  vel = lambda t, x, labels=None: target.velocity(LINEAR, t, x)
  run = jax.jit(lambda key, x0: smc.smc(
      key, x0, flow_map=fm, velocity=vel, interpolant=LINEAR,
      reward=rewards.quadratic(CENTER, REWARD_STD), temperature=LAM, num_steps=steps,
      num_particles=particles, lookahead=lookahead, noise=noise, final_resample=False))
  x0 = jax.random.normal(jax.random.PRNGKey(seed), (groups * particles, 2))
  out = run(jax.random.PRNGKey(seed + 1), x0)
  w = np.exp(np.asarray(out.log_weights, np.float64)).reshape(groups, particles)
  x = np.asarray(out.samples, np.float64).reshape(groups, particles, 2)
  second = np.einsum('gp,gp->g', w, x[..., 0] ** 2)       # per group, self-normalized
  return second.mean(), second.std() / np.sqrt(groups), float(np.mean(np.asarray(out.ess)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--groups', type=int, default=512)
  parser.add_argument('--particles', type=int, default=1024)
  parser.add_argument('--steps', default='2,4,8,16')
  parser.add_argument('--noise', default='0.1,0.25,0.5,1.0')
  args = parser.parse_args()
  exact = tilted_second_moment(STD**2)[0]
  print(f'N(m, diag s^2), m = {MEAN.tolist()}, s = {STD.tolist()}; r = -|x - {CENTER.tolist()}|^2 '
        f'/ (2 * {REWARD_STD}^2), lambda = {LAM}; exact maps; {args.groups} groups x '
        f'{args.particles} particles. E_q[x_0^2] = {exact:.4f}.')
  # The header now and each row as it is measured (a row takes minutes at the default sizes).
  print(benchmarking.markdown_table(['steps', 'noise', 'look-ahead', 'measured error of E[x_0^2]',
                                     'chain law (closed form)', 'mean ESS'], []))
  rows = [(int(k), float(n), 'flow_map') for k in args.steps.split(',') for n in args.noise.split(',')]
  rows += [(4, 0.5, 'denoiser'), (4, 0.5, 'naive')]
  for seed, (steps, noise, look) in enumerate(rows):
    start = time.time()
    got, se, ess = measure(steps, noise, look, args.groups, args.particles, seed)
    predicted = tilted_second_moment(chain_variance(steps, noise))[0]
    row = benchmarking.markdown_row([steps, noise, look, f'{100 * (got / exact - 1):+.2f} % +- {100 * se / exact:.2f} %',
                                     f'{100 * (predicted / exact - 1):+.2f} %', f'{ess:.2f}'])
    print(f'{row}   ({time.time() - start:.0f} s)', flush=True)


if __name__ == '__main__':
  main()
