r"""MNIST-5k steering demo: an unconditional flow map steered to one digit by the
classifier reward r(x) = log p(digit | x) (fmjax.steering.classifier), every method side by side.

Targets the tilted law p(x) p(digit | x)^(1 / lambda). For each method and network-evaluation
count (NFE per returned sample) it reports the share of samples the steering classifier assigns
to the digit, the same share by an independently trained classifier (another seed: a sample that
only fools the steering network does not count there), and the mean reward, and draws one grid
per row into a PNG. Methods: the plain flow map (no steering), best-of-N over 1-step samples,
look-ahead gradient guidance (flow-map, denoiser and naive look-aheads, fmjax.steering.reward_guidance)
and SMC (fmjax.steering.smc).

  python -m fmjax.data.mnist5k --data_dir=~/tensorflow_datasets
  python -m fmjax.main --config=experiments/mnist.py:lsd,mlp --workdir=runs/mnist_uncond \
      --config.data.num_classes=0 --config.data.data_dir=$HOME/tensorflow_datasets --config.eval.at_end=False
  python -m fmjax.steering.train_classifier --workdir=runs/classifier --data_dir=~/tensorflow_datasets
  python -m fmjax.steering.train_classifier --workdir=runs/classifier_eval --seed=1 --steps=1500 \
      --data_dir=~/tensorflow_datasets
  python benchmarks/steering_mnist.py --model_dir=runs/mnist_uncond --classifier_dir=runs/classifier \
      --eval_classifier_dir=runs/classifier_eval --digit=4 --out=docs/img/steering_mnist.png

`--tiny` runs two rows on 8 samples (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fmjax  # noqa: E402
from fmjax import benchmarking, from_config, plotting, samplers  # noqa: E402
from fmjax.steering import classifier, reward_guidance, selection, smc  # noqa: E402
from fmjax.steering.result import SteerResult  # noqa: E402


def base_rows(sample_from_noise, steps_list):
  """The unsteered flow map at k steps (NFE k)."""
  return [(f'flow map, {k} step{"s" * (k > 1)} (no steering)',
           lambda key, x0, k=k: SteerResult(sample_from_noise(x0, k), nfe=k)) for k in steps_list]


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model_dir', required=True)
  parser.add_argument('--classifier_dir', required=True)
  parser.add_argument('--eval_classifier_dir', default=None)
  parser.add_argument('--digit', type=int, default=4)
  parser.add_argument('--temperature', type=float, default=1.0,
                      help='lambda; 1 makes the tilted law p(x) p(digit | x) the class-conditional p(x | digit)')
  parser.add_argument('--num', type=int, default=256, help='samples per row (the grids show 64)')
  parser.add_argument('--best_of', type=int, nargs='+', default=[4, 16])
  parser.add_argument('--steps', type=int, nargs='+', default=[4, 8], help='guidance / SMC steps')
  parser.add_argument('--num_particles', type=int, default=8)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='docs/img/steering_mnist.png')
  parser.add_argument('--json', default=None, help='the table as JSON (default: next to --out)')
  parser.add_argument('--tiny', action='store_true')
  args = parser.parse_args(argv)
  if args.tiny:
    args.num, args.best_of, args.steps, args.num_particles = 8, [2], [2], 4

  # Everything that can fail on input fails before any sampling.
  reward = classifier.load_reward(args.classifier_dir, args.digit)
  judges = {'steer': classifier.load(args.classifier_dir)[0]}
  if args.eval_classifier_dir:
    judges['eval'] = classifier.load(args.eval_classifier_dir)[0]
  model = fmjax.load(args.model_dir)
  if model.num_classes:
    raise ValueError(f'{args.model_dir} holds a class-conditional model; the demo steers an unconditional one '
                     '(train it with --config.data.num_classes=0).')
  interpolant = from_config.build_interpolant(model.config)
  params, fm = model.params, model.parameterization

  def times(t, x):
    return jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))

  def flow_map(s, t, x, labels=None):
    return fm.X(params, times(s, x), times(t, x), x, labels)

  def velocity(t, x, labels=None):
    return fm.velocity(params, times(t, x), x, labels)

  sample_k = jax.jit(lambda x0, k_times: samplers.flow_map_steps(flow_map, x0, k_times))
  sample_from_noise = lambda x0, k: sample_k(x0, jnp.linspace(0.0, 1.0, k + 1))

  def noise(key, n):
    return jax.random.normal(key, (n,) + tuple(model.example_shape))

  rows = base_rows(sample_from_noise, [1] if args.tiny else [1, 4])
  lam = args.temperature

  for n in args.best_of:
    sample_fn = lambda k, count, labels: sample_from_noise(noise(k, count), 1)
    rows.append((f'best-of-{n}, 1-step map',
                 jax.jit(lambda key, x0, n=n: selection.best_of_n(key, sample_fn, reward, x0.shape[0], n,
                                                                 temperature=lam))))

  common = dict(flow_map=flow_map, velocity=velocity, interpolant=interpolant, reward=reward, temperature=lam)
  lookaheads = ['flow_map'] if args.tiny else ['flow_map', 'denoiser', 'naive']
  for k in args.steps:
    for look in lookaheads:
      grid = tuple(float(t) for t in np.linspace(0.0, 1.0, k + 1))   # concrete: the steps unroll
      for keep in ([True, False] if look == 'flow_map' else [True]):
        rows.append((f'guidance, {look} look-ahead{"" if keep else " (no Jacobian)"}, {k} steps',
                     jax.jit(lambda key, x0, grid=grid, look=look, keep=keep: reward_guidance.guided_sample(
                         x0, times=grid, lookahead=look, keep_jacobian=keep, **common))))
      rows.append((f'SMC, {look} look-ahead, {k} steps, {args.num_particles} particles',
                   jax.jit(lambda key, x0, k=k, look=look: smc.smc_sample(
                       key, x0, num_steps=k, num_particles=args.num_particles, lookahead=look, **common))))

  key = jax.random.PRNGKey(args.seed)
  results, panels = [], []
  for name, run in rows:
    k_run = jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)   # a row's key: its name
    x0 = noise(jax.random.PRNGKey(args.seed + 1000), args.num)   # the same noise for every row
    start = time.time()
    out = run(k_run, x0)
    samples = np.asarray(jax.block_until_ready(out.samples))
    seconds = time.time() - start
    row = {'method': name, 'nfe': int(out.nfe), 'seconds': round(seconds, 2),
           'mean_reward': float(np.mean(reward(jnp.asarray(samples))))}
    weights = None if out.log_weights is None else np.exp(np.asarray(out.log_weights, np.float64))
    for judge, net in judges.items():
      hit = np.asarray(jnp.argmax(net(jnp.asarray(samples)), -1)) == args.digit
      row[f'share_{judge}'] = float(hit.mean())
      if weights is not None:
        row[f'weighted_share_{judge}'] = float((weights * hit).sum() / weights.sum())
    if out.ess is not None:
      row['min_ess'] = float(np.min(np.asarray(out.ess)))
    results.append(row)
    panels.append((f"{name}\nNFE {row['nfe']}, digit-{args.digit} share {row.get('share_eval', row['share_steer']):.0%}",
                   samples))
    print(json.dumps(row), flush=True)

  _save_panels(args.out, panels, columns=min(8, args.num))
  path = args.json or os.path.splitext(args.out)[0] + '.json'
  with open(path, 'w') as f:
    json.dump({'digit': args.digit, 'temperature': lam, 'num': args.num, 'rows': results}, f, indent=2)
  print(results_table(results, args.digit))
  return results


def _save_panels(path, panels, columns: int):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  n = len(panels)
  cols = min(4, n)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.8 * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis('off')
  for ax, (title, samples) in zip(axes.flat, panels):
    ax.imshow(plotting.image_grid(samples[:columns * columns], columns), cmap='gray',
              interpolation='nearest')
    ax.set_title(title, fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=80)
  plt.close(fig)
  from PIL import Image
  # 16 gray levels: a sixth of the bytes of the RGBA figure, the digits unchanged to the eye
  Image.open(path).convert('L').quantize(16).save(path, optimize=True, bits=4)


def results_table(rows, digit: int) -> str:
  has_eval = any('share_eval' in r for r in rows)
  head = ['method', 'NFE / sample', f'digit-{digit} share (steering clf)']
  head += ['(held-out clf)'] if has_eval else []
  head += ['mean log p(digit \\| x)', 'ESS']   # markdown's escaped bar: not a column break
  cells = []
  for r in rows:
    row = [r['method'], str(r['nfe']), f"{r['share_steer']:.0%}"]
    row += [f"{r['share_eval']:.0%}"] if has_eval else []
    row += [f"{r['mean_reward']:.2f}", f"{r['min_ess']:.2f}" if 'min_ess' in r else '']
    cells.append(row)
  return benchmarking.markdown_table(head, cells)


if __name__ == '__main__':
  main()
