"""Helpers for the training-system tests: run tests/_train_worker.py in fresh processes."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', '_train_worker.py')


def env_with_devices(num_devices: int) -> dict:
  env = dict(os.environ)
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  env['JAX_PLATFORMS'] = 'cpu'
  env['JAX_NUM_CPU_DEVICES'] = str(num_devices)
  flags = [f for f in env.get('XLA_FLAGS', '').split() if 'force_host_platform_device_count' not in f]
  env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={num_devices}'])
  env['PYTHONUNBUFFERED'] = '1'
  return env


def worker_command(workdir, overrides=None, *extra):
  return [sys.executable, WORKER, str(workdir), json.dumps(overrides or {}), *map(str, extra)]


def run_worker(workdir, overrides=None, *extra, devices=1, timeout=300):
  result = subprocess.run(worker_command(workdir, overrides, *extra), env=env_with_devices(devices),
                          capture_output=True, text=True, timeout=timeout)
  if result.returncode:
    raise AssertionError(f'worker failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}')
  return result


def read_metrics(workdir) -> dict:
  """{step: metrics} from metrics.jsonl; a step logged twice (after a resume) keeps the last."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      row = json.loads(line)
      out[row.pop('step')] = row
  return out


def load_dump(path) -> dict:
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def wait_for_first_checkpoint(process, workdir, timeout: float = 240) -> str:
  """Waits until the training `process` (a Popen of fmjax.main) has saved a checkpoint into
  `workdir` and returns its checkpoint folder; fails with the process's output if it exits first
  or takes longer than `timeout` seconds."""
  import time
  from fmjax import checkpointing
  deadline = time.time() + timeout
  checkpoints = checkpointing.checkpoint_dir(str(workdir))
  while not (os.path.isdir(checkpoints) and any(d.isdigit() for d in os.listdir(checkpoints))):
    assert process.poll() is None and time.time() < deadline, process.communicate()
    time.sleep(0.2)
  return checkpoints
