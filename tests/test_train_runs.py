"""Whole runs in fresh processes: 8 fake CPU devices (data x FSDP) match 1 device, a checkpoint
restores onto another mesh, and a run killed by SIGKILL resumes to the uninterrupted losses.

Each run is tests/_train_worker.py (a 2-D Gaussian mixture, LSD, a 16-wide MLP, 6 steps,
checkpoints every 3) in its own process, because the number of CPU devices is fixed when
JAX starts.
"""

import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fmjax import sharding
from train_testlib import env_with_devices, load_dump, read_metrics, run_worker, worker_command


def test_fsdp_size_rule():
  assert sharding.partition_spec((4096, 512), 8, 1024) == P('fsdp', None)
  assert sharding.partition_spec((100, 512), 8, 1024) == P(None, 'fsdp')    # 100 % 8 != 0
  assert sharding.partition_spec((3, 5), 8, 1) == P()                      # nothing divisible
  assert sharding.partition_spec((4096,), 8, 10_000) == P()                # below the size rule
  assert sharding.partition_spec((4096,), 1, 1) == P()                     # no FSDP axis


@pytest.fixture(scope='module')
def one_device(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('one')
  run_worker(workdir, {}, '--dump', workdir / 'final.npz', devices=1)
  return workdir


def _losses(workdir):
  metrics = read_metrics(workdir)
  assert sorted(metrics) == list(range(1, 7))
  return np.array([metrics[s]['loss'] for s in sorted(metrics)])


def _compare(a_dir, b_dir, rtol, atol):
  losses_a, losses_b = _losses(a_dir), _losses(b_dir)
  np.testing.assert_allclose(losses_b, losses_a, rtol=rtol, atol=atol)
  pa, pb = load_dump(a_dir / 'final.npz'), load_dump(b_dir / 'final.npz')
  assert pa.keys() == pb.keys() and len(pa) > 4
  for k in pa:
    np.testing.assert_allclose(pb[k], pa[k], rtol=rtol, atol=atol, err_msg=k)
  # The parameters moved: the comparison is not between two untouched inits.
  assert losses_a[0] != losses_a[-1]


def test_data_and_fsdp_on_eight_devices_match_one(one_device, tmp_path):
  """A 4 x 2 (data x fsdp) mesh with every parameter sharded (fsdp_min_size = 1), then a
  restore of its step-3 checkpoint onto one device: both match the one-device run."""
  run_worker(tmp_path, {'sharding.data': 4, 'sharding.fsdp': 2}, '--dump', tmp_path / 'final.npz',
             devices=8)
  _compare(one_device, tmp_path, rtol=1e-5, atol=2e-6)
  # Restore onto another mesh: drop the last checkpoint, finish steps 4-6 on one device.
  other = tmp_path / 'moved'
  shutil.copytree(tmp_path, other, ignore=shutil.ignore_patterns('final.npz', 'tensorboard'))
  shutil.rmtree(other / 'checkpoints' / '6')
  run_worker(other, {}, '--dump', other / 'final.npz', devices=1)
  _compare(one_device, other, rtol=1e-5, atol=2e-6)


def test_microbatches_on_eight_devices_match_one(one_device, tmp_path):
  """Gradient accumulation over a sharded batch: 2 microbatches on a 4 x 2 mesh (each device's
  rows split between them, every parameter sharded) match 2 microbatches on one device; and
  the config reaches the step (each microbatch draws its own noise: other losses than one pass)."""
  one, eight = tmp_path / 'one', tmp_path / 'eight'
  run_worker(one, {'train.microbatches': 2}, '--dump', one / 'final.npz', devices=1)
  run_worker(eight, {'train.microbatches': 2, 'sharding.data': 4, 'sharding.fsdp': 2},
             '--dump', eight / 'final.npz', devices=8)
  _compare(one, eight, rtol=1e-5, atol=2e-6)
  assert not np.allclose(_losses(one), _losses(one_device))


def test_kill9_and_resume_reproduces_the_run_bitwise(one_device, tmp_path):
  """SIGKILL after the step-3 checkpoint, restart: the losses equal the uninterrupted run's."""
  env = env_with_devices(1)
  proc = subprocess.Popen(worker_command(tmp_path, {}, '--slow_after', 4), env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  done = tmp_path / 'checkpoints' / '3'
  while time.time() < deadline and proc.poll() is None:
    if done.exists() and (done / 'state').exists() and os.path.exists(tmp_path / 'metrics.jsonl'):
      if max(read_metrics(tmp_path), default=0) >= 4:
        break
    time.sleep(0.1)
  assert proc.poll() is None, f'the run ended before it could be killed:\n{proc.stderr.read()[-3000:]}'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(read_metrics(tmp_path))
  assert 4 <= killed_at < 6
  assert not (tmp_path / 'checkpoints' / '6').exists()
  result = run_worker(tmp_path, {}, devices=1)
  assert 'RESULTS' in result.stdout
  np.testing.assert_array_equal(_losses(tmp_path), _losses(one_device))   # bitwise on CPU
