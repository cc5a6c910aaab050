"""The table of benchmarks/mnist_latent.sh: every evaluation of the latent MNIST chain in one place.

  python benchmarks/mnist_latent_table.py --eval_dir OUT/eval --times OUT/stage_times.txt \
      --distilled lmd --out OUT/mnist_latent.md
  python benchmarks/mnist_latent_table.py --reconstructions OUT/autoencoder --data_dir DATA \
      --num_samples 5000 --reference REF.npz --classifier_dir OUT/classifier --out OUT/eval/reconstructions.json

Reads the `final_metrics.json` copies that the chain's `--mode=eval` runs left in OUT/eval
(flow_matching_euler, flow_matching_heun, lsd, DISTILLED) and reconstructions.json (the
autoencoder's floor), and writes one Markdown table: FID (decoded samples against the 5,000
digits), the share of samples the classifier calls the requested digit with probability >= 0.9,
the total-variation distance of the predicted-class histogram from the requested one, and the
sample count, per sampler and NFE; then whether the goal is met (LSD's 1-step FID within 1.5x
of flow matching's best 32-NFE FID, its 4-step within 1.1x, >= 90 % of 1-step samples
confidently the requested digit) and the stage times.
"""

from __future__ import annotations

import argparse
import json
import math
import os

from fmjax import benchmarking


def _rows(path: str, label: str) -> list[dict]:
  with open(path) as f:
    results = json.load(f)
  rows = []
  for family in ('few_step', 'ode'):
    for row in sorted(results.get(family, {}).values(), key=lambda r: r['nfe']):
      sampler = (f"{row['steps']}-step map" if family == 'few_step'
                 else f"ODE {row['method']}, {row['steps']} steps")
      rows.append({'model': label, 'sampler': sampler, **row})
  return rows


def _cell(value, fmt):
  return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def table(eval_dir: str, distilled: str) -> tuple[str, dict]:
  """The Markdown table and the goal's numbers."""
  rows = []
  recon = os.path.join(eval_dir, 'reconstructions.json')
  if os.path.exists(recon):
    with open(recon) as f:
      r = json.load(f)
    rows.append({'model': 'autoencoder', 'sampler': 'reconstruction (floor)', 'nfe': None, **r})
  # Maps distilled from the guided teacher (the chain's TEACHER_GUIDANCE) are eval/DISTILLED_wSCALE.json.
  guided = sorted(f[:-5] for f in os.listdir(eval_dir) if f.startswith(f'{distilled}_w') and f.endswith('.json'))
  for name, label in (('flow_matching_euler', 'flow matching'), ('flow_matching_heun', 'flow matching'),
                      ('lsd', 'LSD'), ('meanflow', 'MeanFlow'), (distilled, f'{distilled} (from flow matching)'),
                      *((name, f'{distilled} (from flow matching, guidance {name[len(distilled) + 2:]})')
                        for name in guided)):
    path = os.path.join(eval_dir, f'{name}.json')
    if os.path.exists(path):
      rows += _rows(path, label)
  cells = [[r['model'], r['sampler'], _cell(r.get('nfe'), 'd'), _cell(r.get('fid'), '.2f'),
            _cell(None if r.get('confident_share') is None else 100 * r['confident_share'], '.1f') + ' %',
            _cell(r.get('class_tv'), '.3f'), r.get('num_samples', '-')] for r in rows]
  lines = [benchmarking.markdown_table(
      ['model', 'sampler', 'NFE', 'FID', 'p >= 0.9 as requested', 'class TV', 'samples'], cells)]
  fm32 = [r['fid'] for r in rows if r['model'] == 'flow matching' and r.get('nfe') == 32]
  lsd = {r['steps']: r for r in rows if r['model'] == 'LSD'}
  goal = {}
  if fm32 and 1 in lsd and 4 in lsd:
    base = min(fm32)
    goal = {'flow_matching_32nfe_fid': base, 'lsd_1step_ratio': lsd[1]['fid'] / base,
            'lsd_4step_ratio': lsd[4]['fid'] / base,
            'lsd_1step_confident': lsd[1].get('confident_share')}
    met = (goal['lsd_1step_ratio'] <= 1.5, goal['lsd_4step_ratio'] <= 1.1,
           (goal['lsd_1step_confident'] or 0) >= 0.9)
    lines += ['', f"Goal (flow matching's best 32-NFE FID {base:.2f}): LSD 1 step {goal['lsd_1step_ratio']:.2f}x "
              f"(aim <= 1.5x: {'met' if met[0] else 'not met'}), 4 steps {goal['lsd_4step_ratio']:.2f}x "
              f"(aim <= 1.1x: {'met' if met[1] else 'not met'}), 1-step samples confidently the requested "
              f"digit {100 * (goal['lsd_1step_confident'] or 0):.1f} % (aim >= 90 %: "
              f"{'met' if met[2] else 'not met'})."]
  return '\n'.join(lines), goal


def reconstructions(folder: str, data_dir: str, num_samples: int, reference: str,
                    classifier_dir: str) -> dict:
  """The floor row: FID of the autoencoder's reconstructions (posterior mean) of the first
  `num_samples` digits of all 5,000, and the classifier's judgement of them (true labels)."""
  import numpy as np
  from fmjax import autoencoders
  from fmjax.autoencoders import train as ae_train
  from fmjax.evaluation import sweep
  from fmjax.steering import classifier
  out = ae_train.reconstruction_fid(folder, data_dir, num_samples, split='train+test',
                                    reference=reference)
  images, labels = classifier.load_split(data_dir, 'train+test')
  vae = autoencoders.load(folder)
  recon = vae.decode(vae.encode(images[:num_samples])[0])
  model, _ = classifier.load(classifier_dir)
  logits = np.asarray(classifier.logits_fn(model)(recon))
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  judged = {'confident': 0, 'predicted': None, 'requested': None}
  sweep.count_classes(judged, probs, np.asarray(labels[:num_samples]), 0.9)
  return {**out, **sweep.class_metrics(judged)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--eval_dir')
  parser.add_argument('--distilled', default='lmd')
  parser.add_argument('--times', default=None, help='the chain\'s stage_times.txt')
  parser.add_argument('--out', required=True)
  parser.add_argument('--reconstructions', default=None, help='an autoencoder folder: write its floor row')
  parser.add_argument('--data_dir')
  parser.add_argument('--num_samples', type=int, default=5000)
  parser.add_argument('--reference')
  parser.add_argument('--classifier_dir')
  args = parser.parse_args(argv)
  if args.reconstructions:
    row = reconstructions(args.reconstructions, args.data_dir, args.num_samples, args.reference,
                          args.classifier_dir)
    benchmarking.write(args.out, json.dumps(row, indent=2))
    print(json.dumps(row))
    return
  text, _ = table(args.eval_dir, args.distilled)
  if args.times and os.path.exists(args.times):
    with open(args.times) as f:
      text += '\n\nStage times (this machine):\n\n' + ''.join(f'    {line}' for line in f)
  benchmarking.write(args.out, text + '\n')


if __name__ == '__main__':
  main()
