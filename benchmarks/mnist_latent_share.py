r"""How often a latent MNIST run draws the digit it is asked for, in seconds instead of an FID row's
quarter hour: the share of `--num` decoded samples (labels 0-9 in turn) that the in-repo
classifier gives p(requested digit) >= 0.9, with no Inception pass. Useful to follow a run
checkpoint by checkpoint (benchmarks/mnist_latent.sh keeps the last three) and to compare
settings at equal compute before paying for FID.

  python benchmarks/mnist_latent_share.py --classifier_dir runs/mnist_latent/classifier \
      runs/mnist_latent/flow_matching:4000:8 runs/mnist_latent/lsd:4000:1 runs/mnist_latent/lsd::4:2.0

Each RUN[:STEP[:STEPS[:GUIDANCE]]] is a workdir, the checkpoint step (empty: the latest), the
sampling steps of `fmjax.load(...).sample` (for a flow-matching run: Euler steps of its ODE;
default 1) and the classifier-free guidance scale (default 1: none). Every row draws the same
noise (--seed) and labels.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fmjax  # noqa: E402
from fmjax.steering import classifier  # noqa: E402

CONFIDENT = 0.9


def parse_spec(spec: str) -> tuple[str, int | None, int, float]:
  """'RUN[:STEP[:STEPS[:GUIDANCE]]]' -> (run, step or None, steps, guidance scale)."""
  parts = spec.split(':')
  if len(parts) > 4 or not parts[0]:
    raise ValueError(f'{spec!r}: expected RUN[:STEP[:STEPS[:GUIDANCE]]], e.g. runs/ml/lsd:4000:1.')
  parts += [''] * (4 - len(parts))
  try:
    return (parts[0], int(parts[1]) if parts[1] else None, int(parts[2] or 1),
            float(parts[3] or 1.0))
  except ValueError:
    raise ValueError(f'{spec!r}: STEP and STEPS must be integers and GUIDANCE a number.') from None


def confident_share(probabilities: np.ndarray, labels: np.ndarray) -> float:
  """Share of rows whose probability of their own label is >= CONFIDENT."""
  return float(np.mean(probabilities[np.arange(len(labels)), labels] >= CONFIDENT))


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('specs', nargs='+', metavar='RUN[:STEP[:STEPS[:GUIDANCE]]]')
  parser.add_argument('--classifier_dir', required=True)
  parser.add_argument('--num', type=int, default=1000)
  parser.add_argument('--seed', type=int, default=1)
  args = parser.parse_args(argv)
  try:
    specs = [parse_spec(s) for s in args.specs]
  except ValueError as e:
    parser.error(str(e))
  net, _ = classifier.load(args.classifier_dir)
  probabilities = jax.jit(lambda x: jax.nn.softmax(classifier.logits_fn(net)(x), -1))
  labels = np.arange(args.num) % 10
  rows = []
  for run, step, steps, guidance in specs:
    model = fmjax.load(run, step=step)
    start = time.time()
    x = model.sample(jax.random.key(args.seed), args.num, steps=steps, labels=labels,
                     guidance_scale=guidance, progress=False)
    row = {'run': run, 'step': step, 'steps': steps, 'guidance': guidance, 'num': args.num,
           'confident_share': confident_share(np.asarray(probabilities(x)), labels),
           'seconds': round(time.time() - start, 1)}
    rows.append(row)
    print(f"{run} step {step if step is not None else 'latest'}, {steps} steps, guidance {guidance:g}: "
          f"{row['confident_share']:.1%} of {args.num} confidently the requested digit "
          f"({row['seconds']} s)", flush=True)
  return rows


if __name__ == '__main__':
  main()
