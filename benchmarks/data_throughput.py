"""Batches per second of the training input pipeline (fmjax.data.pipelines.ImageSource) for an
experiment, with and without the in-memory read, at grain's default 16 reading threads and at
the configured count: the ceiling the pipeline puts on steps per second, whatever the device.
Variants alternate for --rounds rounds in one process (a busy machine slows each alike).

  python benchmarks/data_throughput.py --experiment mnist_latent:flow_matching,h100 \\
      --data_dir runs/mnist_latent/tfds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fmjax import sharding  # noqa: E402
from fmjax.data import pipelines  # noqa: E402
from train_throughput import experiment_config  # noqa: E402  (benchmarks/ is on the path)

VARIANTS = {'decode every read, 16 threads': (0.0, 16), 'in memory, 16 threads': (2.0, 16),
            'in memory, 4 threads': (2.0, 4)}


def batches_per_second(config, in_memory_gib: float, threads: int, batches: int) -> float:
  config = config.copy_and_resolve_references()
  config.data.in_memory_gib, config.data.read_threads = in_memory_gib, threads
  mesh = sharding.make_mesh()
  source = pipelines.make_source(config, mesh)
  jax.block_until_ready(source.batch(0))     # the first batch: start-up, not throughput
  start = time.perf_counter()
  for i in range(batches):
    out = source.batch(i + 1)
  jax.block_until_ready(out)
  return batches / (time.perf_counter() - start)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--experiment', required=True, help='NAME[:ARG] of experiments/NAME.py')
  parser.add_argument('--data_dir', default='')
  parser.add_argument('--batches', type=int, default=50)
  parser.add_argument('--rounds', type=int, default=3)
  args = parser.parse_args(argv)
  name, _, arg = args.experiment.partition(':')
  config = experiment_config(name, arg)
  if args.data_dir:
    config.data.data_dir = args.data_dir
  rates = {name: [] for name in VARIANTS}
  for _ in range(args.rounds):
    for name, (gib, threads) in VARIANTS.items():
      rates[name].append(batches_per_second(config, gib, threads, args.batches))
  print(f'{config.data.name}, global batch {config.train.batch_size}, {args.batches} batches x '
        f'{args.rounds} rounds (median), {os.cpu_count()} CPUs')
  result = {name: statistics.median(r) for name, r in rates.items()}
  for name, rate in result.items():
    print(f'  {name}: {rate:.1f} batches/s')
  return result


if __name__ == '__main__':
  main()
