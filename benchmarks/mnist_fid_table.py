"""The MNIST-5k FID table of benchmarks/gpu_mnist_fid.sh, from its workdirs' final_metrics.json.

  python benchmarks/mnist_fid_table.py [--device NAME] OUT/mnist_lsd OUT/mnist_meanflow ...

One column per (rule, sampler family) that has rows, one row per NFE; then the samples per
sampler, the reference and the training/eval wall times (wall_s.json, written by the script).
"""

import argparse
import json
import os

from fmjax import benchmarking


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('workdirs', nargs='+')
  parser.add_argument('--device', default='')
  args = parser.parse_args(argv)
  columns, notes = {}, []
  for wd in args.workdirs:
    path = os.path.join(wd, 'final_metrics.json')
    if not os.path.exists(path):
      notes.append(f'{wd}: no final_metrics.json (training or evaluation failed; see its logs)')
      continue
    with open(path) as f:
      results = json.load(f)
    rule = os.path.basename(os.path.normpath(wd)).removeprefix('mnist_')
    for family, label in (('few_step', 'flow map'), ('ode', 'ODE')):
      rows = results.get(family) or {}
      if rows:
        columns[f'{rule} {label}'] = {int(k): v for k, v in rows.items()}
    wall = os.path.join(wd, 'wall_s.json')
    times = json.load(open(wall)) if os.path.exists(wall) else {}
    ref = results.get('fid_reference', {})
    notes.append(f'{rule}: {results.get("fid_num_samples")} samples per sampler vs '
                 f'{ref.get("dataset")}/{ref.get("split")} ({ref.get("count")} images); '
                 f'train {times.get("train_s", "?")} s, eval {times.get("eval_s", "?")} s (wall, '
                 'compilation included)')
  nfes = sorted({n for col in columns.values() for n in col})
  cells = []
  for n in nfes:
    fids = [(col.get(n) or {}).get('fid') for col in columns.values()]
    cells.append([n] + ['' if fid is None else f'{fid:.2f}' for fid in fids])
  lines = [f'# MNIST-5k few-step FID{" (" + args.device + ")" if args.device else ""}', '',
           benchmarking.markdown_table(['NFE'] + list(columns), cells)]
  print('\n'.join(lines + [''] + [f'- {n}' for n in notes]))


if __name__ == '__main__':
  main()
