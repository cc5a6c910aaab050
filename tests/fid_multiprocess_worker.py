"""One process of the multi-host FID test (tests/test_fid.py). Usage: worker.py RANK N PORT OUTDIR.

Each process owns different images (13 per process, fed in local batches of 4 -> a partial last
batch), extracts features over a mesh spanning all processes' devices, and saves the gathered
statistics; the test checks that both hosts hold the statistics of all 26 images.
"""

import sys

import jax
import numpy as np


def main():
  rank, nproc, port, outdir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
  jax.distributed.initialize(f'127.0.0.1:{port}', nproc, rank)
  from fmjax.evaluation import fid  # after initialize: the extractor reads the process count
  sys.path.insert(0, __file__.rsplit('/', 1)[0])
  from test_fid import fake_features

  rng = np.random.default_rng(0)  # same on every process: all images and weights known to all
  all_images = rng.integers(0, 256, (nproc * 13, 4, 4, 3), dtype=np.uint8)
  w = rng.normal(size=(48, 6)).astype(np.float32)
  mine = all_images[rank * 13:(rank + 1) * 13]

  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  extractor = fid.FeatureExtractor({'w': w}, batch_size=8, mesh=mesh, feature_fn=fake_features)
  batches = [mine[i:i + 4] for i in range(0, 13, 4)]
  stats = fid.compute_statistics(extractor, batches, num_samples=nproc * 13, dataset='t', split='s')
  np.savez(f'{outdir}/stats_{rank}.npz', mu=stats.mu, sigma=stats.sigma, count=stats.count,
           all_images=all_images, w=w, num_traces=extractor.num_traces,
           num_devices=jax.device_count())
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
