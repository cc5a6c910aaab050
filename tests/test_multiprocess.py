"""Real multi-process JAX: 2 processes x 2 CPU devices on localhost (gloo collectives).

The processes train with each feeding only its half of every batch
(jax.make_array_from_process_local_data), checkpoint at step 3 and finish at step 6; a
second launch restores the step-3 checkpoint and must reproduce steps 4-6.
"""

import json
import shutil
import subprocess

import numpy as np

from train_testlib import env_with_devices, free_port, read_metrics, worker_command

OVERRIDES = {'data.on_device': False, 'train.batch_size': 16}


def _launch(workdir, *extra, overrides=OVERRIDES, timeout=300):
  port = free_port()
  procs = [subprocess.Popen(worker_command(workdir, overrides, '--coordinator', f'127.0.0.1:{port}',
                                           '--num_processes', 2, '--process_id', i, *extra),
                            env=env_with_devices(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
           for i in range(2)]
  outputs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=timeout)
      outputs.append((p.returncode, out, err))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for code, out, err in outputs:
    assert code == 0, f'process failed ({code}):\n{out[-2000:]}\n{err[-5000:]}'
  return outputs


def test_two_processes_train_checkpoint_and_restore(tmp_path):
  outputs = _launch(tmp_path)
  assert '4 devices in 2 process(es)' in outputs[0][1]
  first = read_metrics(tmp_path)
  assert sorted(first) == list(range(1, 7))
  assert all(np.isfinite(m['loss']) for m in first.values())
  assert (tmp_path / 'checkpoints' / '3').exists() and (tmp_path / 'checkpoints' / '6').exists()

  shutil.rmtree(tmp_path / 'checkpoints' / '6')
  outputs = _launch(tmp_path)
  assert 'resumed at step 3' in outputs[0][1]
  second = read_metrics(tmp_path)
  for step in (4, 5, 6):
    np.testing.assert_allclose(second[step]['loss'], first[step]['loss'], rtol=1e-6)


def test_sigterm_on_one_process_stops_both_after_the_same_update(tmp_path):
  """Process 1 alone gets SIGTERM while fetching batch 5: its flag travels through the jitted
  step, so both processes read it one update later, stop after update 7 and save step 7."""
  overrides = dict(OVERRIDES, **{'train.num_steps': 100, 'train.log_every': 50,
                                 'train.checkpoint_every': 0})
  outputs = _launch(tmp_path, '--sigterm_at', 5, overrides=overrides)
  results = [json.loads(out.split('RESULTS ')[-1]) for _, out, _ in outputs]
  assert results == [{'preempted_at': 7, 'signal': 'SIGTERM'}] * 2
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['7']
