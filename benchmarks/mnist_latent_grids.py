"""Sample grids of the latent MNIST chain side by side (benchmarks/mnist_latent.sh): LSD in 1 and
4 steps, the distilled map in 1 step and flow matching's Euler ODE in 32 steps, from the same
noise and the same labels (row r of every panel asks for digit r), decoded by the run's
autoencoder.

  python benchmarks/mnist_latent_grids.py --runs runs/mnist_latent --distilled lmd \
      --out docs/img/mnist_latent_grids.png

Every panel is drawn without classifier-free guidance (scale 1), as the chain's table scores them.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fmjax  # noqa: E402
from fmjax import plotting  # noqa: E402


def euler_ode(model, key, labels, nfe: int) -> np.ndarray:
  """Euler steps of the run's velocity b(t, x) on the uniform grid (t = 0 noise -> 1 data), from
  the noise `model.sample` would draw with the same key, then decoded."""
  x = model.noise(key, len(labels))
  y = np.asarray(labels, np.int32)
  for i in range(nfe):   # Model.velocity checks its inputs on the host, then runs jitted
    t = np.full((x.shape[0],), i / nfe, np.float32)
    x = x + model.velocity(t, x, y) / nfe
  return np.asarray(model.decode(x))


def _distilled_title(name: str) -> str:
  """'lmd' -> 'LMD (distilled), 1 step'; a run distilled from the guided teacher (the chain's
  RULE_wSCALE) names its scale."""
  rule, _, scale = name.partition('_w')
  return f'{rule.upper()} (distilled{f", teacher guided {scale}" if scale else ""}), 1 step'


def panels(runs: str, distilled, per_digit: int, seed: int, flow_map_run: str = 'lsd'):
  """[(title, decoded images [10 * per_digit, 28, 28, 1])], digit-major order: `flow_map_run`
  in 1 and 4 steps, each run of `distilled` (a name, several, or None) in 1 step (those
  present), flow matching's Euler ODE at 32 NFE."""
  labels = np.repeat(np.arange(10), per_digit)
  key = jax.random.PRNGKey(seed)
  out = []
  model = fmjax.load(os.path.join(runs, flow_map_run))
  for steps in (1, 4):
    out.append((f'{flow_map_run.upper()}, {steps} step{"s" * (steps > 1)}',
                np.asarray(model.sample(key, len(labels), steps=steps, labels=labels))))
  for name in [distilled] if isinstance(distilled, str) else (distilled or ()):
    if name != flow_map_run and os.path.isdir(os.path.join(runs, name)):
      model = fmjax.load(os.path.join(runs, name))
      out.append((_distilled_title(name), np.asarray(model.sample(key, len(labels), steps=1, labels=labels))))
  fm = fmjax.load(os.path.join(runs, 'flow_matching'))
  out.append(('flow matching, Euler ODE, 32 NFE', euler_ode(fm, key, labels, 32)))
  return out


def save(path: str, drawn, per_digit: int) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(drawn), figsize=(2.6 * len(drawn), 3.1), squeeze=False)
  for ax, (title, images) in zip(axes.flat, drawn):
    ax.imshow(plotting.image_grid(images, per_digit), cmap='gray', interpolation='nearest')
    ax.set_title(title, fontsize=7)
    ax.axis('off')
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  from PIL import Image
  # 16 gray levels: a fraction of the bytes, the digits unchanged to the eye
  Image.open(path).convert('L').quantize(16).save(path, optimize=True, bits=4)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--runs', required=True, help="the chain's OUT folder")
  parser.add_argument('--distilled', nargs='*', default=['lmd'],
                      help='the distilled runs under --runs (each skipped if absent), e.g. lmd lmd_w1.5')
  parser.add_argument('--per_digit', type=int, default=8, help='samples per digit (columns)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='docs/img/mnist_latent_grids.png')
  args = parser.parse_args(argv)
  drawn = panels(args.runs, args.distilled, args.per_digit, args.seed)
  save(args.out, drawn, args.per_digit)
  print(f'wrote {args.out}: ' + ', '.join(title for title, _ in drawn))


if __name__ == '__main__':
  main()
