"""Throughput and accuracy of the FID Inception features on the current device.

  PYTHONPATH=. python benchmarks/fid_features.py [--weights PATH] [--batch 500] [--size 32]

For each conv precision (HIGHEST = true float32, the default; DEFAULT = TF32 on NVIDIA GPUs /
bf16 passes on TPUs): the error against the TorchScript golden features
(tests/data/inception_golden.npz) and images/s for uint8 [batch, size, size, 3] inputs (resize
to 299 included; the median of --iters calls after the first), so one can judge the time of a 50,000-sample FID and whether the faster
precision is acceptable.
"""

import argparse
import json
import os

import jax
import numpy as np

from fmjax import benchmarking
from fmjax.evaluation import inception

GOLDEN = os.path.join(os.path.dirname(__file__), '..', 'tests', 'data', 'inception_golden.npz')


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--weights', default=None)
  parser.add_argument('--batch', type=int, default=500)
  parser.add_argument('--size', type=int, default=32)
  parser.add_argument('--iters', type=int, default=5)
  args = parser.parse_args()
  params = jax.device_put(inception.load_params(args.weights))
  golden = np.load(GOLDEN)
  images = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3),
                                             dtype=np.uint8)
  images = jax.device_put(images)
  for name, precision in (('highest', jax.lax.Precision.HIGHEST),
                          ('default', jax.lax.Precision.DEFAULT)):
    fn = jax.jit(lambda p, x, precision=precision: inception.features(p, x, precision))
    errors = {}
    for k in ('a', 'b'):
      ours = np.asarray(fn(params, golden[f'images_{k}']))
      ref = golden[f'features_{k}']
      errors[k] = dict(max_abs=float(np.abs(ours - ref).max()),
                       rel_l2=float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)))
    call = lambda: fn(params, images)
    compile_s = benchmarking.time_calls(call, repeats=1, warmup=0).median_s   # the first call
    dt = benchmarking.time_calls(call, repeats=args.iters, warmup=0).median_s
    print(json.dumps(dict(device=str(jax.devices()[0].device_kind), precision=name,
                          batch=args.batch, size=args.size, first_call_s=round(compile_s, 2),
                          images_per_s=round(args.batch / dt, 1),
                          fid50k_feature_s=round(50_000 / (args.batch / dt), 1),
                          golden_error=errors)))


if __name__ == '__main__':
  main()
