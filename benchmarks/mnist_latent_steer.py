r"""Steering the latent MNIST flow map (benchmarks/mnist_latent.sh) toward one digit at a time, by
the public API: `fmjax.load(OUT/lsd).steer(key, n, reward, method=...)` with the in-repo
classifier reward r(x) = log p(digit | x) judged on the decoded 28 x 28 images.

The run is class-conditional with label dropout, so it also samples unconditionally (the null
label, `labels=None`); steering starts from that unconditional model and aims at the tilted law
p(x) p(digit | x)^(1 / lambda) (lambda = 1: the class-conditional law p(x | digit)). Rows, at
their reported network evaluations per returned sample (NFE):

  unsteered         the null-label map in 1 step (the base rate of each digit, ~10 %)
  conditional       the map given the digit as its label, 1 step (what training on labels gives)
  best-of-N         N 1-step null-label candidates, one kept by importance (softmax of r / lambda)
  guidance          reward-gradient guidance with the flow-map look-ahead, gradients through the
                    decoder
  SMC               twisted SMC with the flow-map look-ahead, P particles per group

For each row: the share of samples the classifier assigns to the asked digit with probability
>= 0.9 (`confident`), the share of argmax hits, and the mean reward, averaged over the target
digits (default 0-9, num / 10 samples each).

  python benchmarks/mnist_latent_steer.py --run runs/mnist_latent/lsd \
      --classifier_dir runs/mnist_latent/classifier --out runs/mnist_latent/eval/steering.json
  python benchmarks/mnist_latent_steer.py ... --tiny      # 4 samples per row, no SMC row: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fmjax  # noqa: E402
from fmjax import benchmarking  # noqa: E402
from fmjax.steering import classifier  # noqa: E402

CONFIDENT = 0.9


def rows(best_of: list[int], steps: int, particles: int, smc: bool = True):
  """(name, kwargs of Model.steer or None for plain sampling, conditional?) per row."""
  out = [('unsteered (null label), 1 step', None, False),
         ('conditional (label = digit), 1 step', None, True)]
  out += [(f'best-of-{n}, 1-step candidates', dict(method='best_of_n', steps=1, num_particles=n), False)
          for n in best_of]
  out.append((f'guidance, flow-map look-ahead, {steps} steps',
              dict(method='guidance', steps=steps, lookahead='flow_map'), False))
  if smc:
    out.append((f'SMC, flow-map look-ahead, {steps} steps, {particles} particles',
                dict(method='smc', steps=steps, lookahead='flow_map', num_particles=particles), False))
  return out


def judge(probs: np.ndarray, digit: int) -> tuple[float, float]:
  """(share with p(digit | x) >= 0.9, share whose argmax is the digit)."""
  return float(np.mean(probs[:, digit] >= CONFIDENT)), float(np.mean(np.argmax(probs, -1) == digit))


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--run', required=True, help='a class-conditional latent run (fmjax workdir)')
  parser.add_argument('--classifier_dir', required=True)
  parser.add_argument('--temperature', type=float, default=1.0)
  parser.add_argument('--num', type=int, default=500, help='samples per row, split evenly over --digits')
  parser.add_argument('--digits', type=int, nargs='+', default=list(range(10)),
                      help='target digits (each compiles its own reward into the steered samplers)')
  parser.add_argument('--best_of', type=int, nargs='+', default=[4, 8])
  parser.add_argument('--steps', type=int, default=4, help='guidance / SMC steps')
  parser.add_argument('--num_particles', type=int, default=8)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default=None, help='the table as JSON')
  parser.add_argument('--tiny', action='store_true')
  args = parser.parse_args(argv)
  if args.tiny:
    args.num, args.digits, args.best_of, args.steps, args.num_particles = 4, [3], [2], 2, 2
  if any(not 0 <= d <= 9 for d in args.digits):
    parser.error(f'--digits must be digits 0-9, got {args.digits}.')
  per_digit = args.num // len(args.digits)
  if per_digit < 1 or per_digit % args.num_particles:
    parser.error(f'--num / len(--digits) = {per_digit} must be a positive multiple of --num_particles '
                 f'({args.num_particles}): SMC returns whole groups.')

  # Everything that can fail on input fails before any sampling.
  model = fmjax.load(args.run)
  if not model.num_classes:
    parser.error(f'{args.run} is unconditional; this benchmark compares steering with the labels '
                 'of a class-conditional run (benchmarks/steering_mnist.py steers unconditional ones).')
  net, _ = classifier.load(args.classifier_dir)
  probabilities = jax.jit(lambda x: jax.nn.softmax(classifier.logits_fn(net)(x), -1))
  rewards = [classifier.reward_from_model(net, d) for d in range(10)]

  results = []
  for name, steer, conditional in rows(args.best_of, args.steps, args.num_particles, smc=not args.tiny):
    start, nfe = time.time(), 1
    confident, hits, mean_reward = [], [], []
    for digit in args.digits:
      key = jax.random.fold_in(jax.random.PRNGKey(args.seed), digit)
      if steer is None:
        labels = np.full(per_digit, digit) if conditional else None
        x = np.asarray(model.sample(key, per_digit, steps=1, labels=labels))
      else:
        out = model.steer(key, per_digit, rewards[digit], temperature=args.temperature,
                          progress=False, **steer)
        x, nfe = np.asarray(out.samples), int(out.nfe)
      c, h = judge(np.asarray(probabilities(x)), digit)
      confident.append(c)
      hits.append(h)
      mean_reward.append(float(np.mean(rewards[digit](x))))
    row = {'method': name, 'nfe': nfe, 'confident_share': float(np.mean(confident)),
           'argmax_share': float(np.mean(hits)), 'mean_reward': float(np.mean(mean_reward)),
           'samples': per_digit * len(args.digits), 'seconds': round(time.time() - start, 1)}
    results.append(row)
    print(json.dumps(row), flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump({'run': args.run, 'temperature': args.temperature, 'rows': results}, f, indent=2)
  print(markdown_table(results, args.temperature))
  return results


def markdown_table(results: list[dict], temperature: float) -> str:
  header = [f'method (lambda = {temperature:g})', 'NFE / sample', f'p(digit) >= {CONFIDENT}',
            'argmax = digit', r'mean log p(digit \| x)', 'samples']
  return benchmarking.markdown_table(header, [
      [r['method'], r['nfe'], f"{r['confident_share']:.1%}", f"{r['argmax_share']:.1%}",
       f"{r['mean_reward']:.2f}", r['samples']] for r in results])

if __name__ == '__main__':
  main()
