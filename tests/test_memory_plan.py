"""benchmarks/memory_plan.py at its CI size: the tiny DiT's LSD step compiled for 8 fake CPU
devices, fully sharded (FSDP 8). The per-device numbers must add up: XLA's argument size
is exactly the state shards plus the batch shard, the donated state is aliased whole, and FSDP
keeps a fraction of the replicated state on each device. The block-rematerialized step keeps
the same state and far less for its backward pass."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))


@pytest.fixture(scope='module')
def rows(tmp_path_factory):
  out = tmp_path_factory.mktemp('memory_plan')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'memory_plan.py'), '--tiny',
                  '--devices', '8', '--meshes', '1x8', '--rules', 'lsd', '--batch', '16',
                  '--remat', 'none,block', '--blocks', 'unrolled,scanned', '--schedule', 'memory',
                  '--json', str(out / 'rows.json'), '--out', str(out / 'plan.md')],
                 check=True, cwd=ROOT, env={**env, 'PYTHONPATH': ROOT}, capture_output=True, text=True)
  with open(out / 'rows.json') as f:
    return {(r['mesh'], r['remat']) + (('scanned',) if r['scan_blocks'] else ()): r for r in json.load(f)}


def test_per_device_bytes_add_up(rows):
  for r in rows.values():
    assert 'error' not in r, r
    assert r['batch'] == 16 and r['batch_per_device'] == 2
    # 16 x 8 x 8 x 4 float32 inputs and int32 labels split over 8 devices, and each device's
    # int32 stop flag.
    assert r['batch_bytes'] == 16 * 8 * 8 * 4 * 4 // 8 + 16 * 4 // 8 + 4
    assert r['arg_bytes'] == r['state_bytes'] + r['batch_bytes']
    assert r['alias_bytes'] == r['state_bytes']                # the donated state, in place
    assert r['peak_bytes'] == r['arg_bytes'] + r['out_bytes'] - r['alias_bytes'] + r['temp_bytes']
    assert r['temp_bytes'] > 0


def test_fsdp_shards_the_state(rows):
  # Replicated, every device would hold params, two Adam moments and one EMA copy of ~77k
  # float32 parameters (plus a few scalars); FSDP keeps an eighth of the arrays large enough to
  # shard, and the small ones whole.
  r = rows['1x8', 'none']
  replicated = 4 * 4 * r['params_m'] * 1e6
  assert replicated / 8 < r['state_bytes'] < replicated / 6


def test_remat_keeps_the_state_and_less_for_the_backward(rows):
  plain, remat = rows['1x8', 'none'], rows['1x8', 'block']
  assert remat['state_bytes'] == plain['state_bytes']
  # Without remat the kept activations are most of XLA's temporaries: the same order (XLA fuses
  # away some elementwise residuals and adds gradient scratch; DiT-XL/2 LSD at 32 examples per
  # device keeps 38.3 GiB in 35.0 GiB of temporaries). Each block kept as its input: a fraction.
  assert 0.25 * plain['temp_bytes'] < plain['kept_bytes'] < 2 * plain['temp_bytes']
  assert 0 < remat['kept_bytes'] < 0.2 * plain['kept_bytes']


def test_scanned_rows_are_planned_with_the_same_batch_and_remat(rows):
  # The scanned step (one compiled block body) plans the same network: the same batch bytes,
  # parameters and kept activations as the unrolled one to a few bytes, and remat acts on it.
  for remat in ('none', 'block'):
    unrolled, scanned = rows['1x8', remat], rows['1x8', remat, 'scanned']
    assert scanned['model'].endswith(', scanned') and not unrolled['model'].endswith('scanned')
    assert scanned['batch_bytes'] == unrolled['batch_bytes'] and scanned['params_m'] == unrolled['params_m']
    assert abs(scanned['kept_bytes'] - unrolled['kept_bytes']) < 0.02 * unrolled['kept_bytes']
  assert rows['1x8', 'block', 'scanned']['kept_bytes'] < 0.2 * rows['1x8', 'none', 'scanned']['kept_bytes']


def test_the_plan_asks_for_the_memory_minimizing_schedule(rows):
  import memory_plan   # pylint: disable=import-outside-toplevel
  expected = 'memory' if memory_plan._flag_known(memory_plan.MEMORY_SCHEDULE_FLAG) else 'concurrency'
  assert {r['schedule'] for r in rows.values()} == {expected}
  assert not memory_plan._flag_known('--xla_cpu_no_such_flag_for_fmjax=true')


def test_largest_per_chip_picks_the_largest_fitting_model():
  import memory_plan   # pylint: disable=import-outside-toplevel
  rows = [{'model': 'small', 'rule': 'lsd', 'mesh': '1x8', 'batch': 256, 'params_m': 100,
           'fits': ['TPU v5e', 'H100']},
          {'model': 'large', 'rule': 'lsd', 'mesh': '1x8', 'batch': 256, 'params_m': 600,
           'fits': ['H100']},
          {'model': 'huge', 'rule': 'meanflow', 'mesh': '1x8', 'batch': 256, 'params_m': 900,
           'fits': ['H100', 'TPU v5e']},
          {'model': 'larger', 'rule': 'lsd', 'mesh': '1x8', 'batch': 256, 'params_m': 700, 'remat': 'block',
           'fits': ['H200']}]
  best = memory_plan.largest_per_chip(rows)
  assert best['H100'].startswith('large') and best['TPU v5e'].startswith('small')
  assert best['TPU v4'] == 'none'
  assert best['H200'] == 'larger (1x8, batch 256, remat block)'
  assert memory_plan.fits(0.9 * 16 * 2**30) == list(memory_plan.CHIPS)
  assert 'TPU v5e' not in memory_plan.fits(0.9 * 16 * 2**30 + 1)


def test_the_unet_plans_with_its_batch(tmp_path):
  """--size unet: the CIFAR-10 U-Net preset (tiny here), its residual blocks rematerialized
  (what each policy keeps is tests/test_remat.py's); --blocks scanned, a DiT option, is refused."""
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  command = [sys.executable, os.path.join(ROOT, 'benchmarks', 'memory_plan.py'), '--tiny', '--size', 'unet',
             '--devices', '8', '--meshes', '8x1', '--rules', 'flow_matching', '--batch', '16', '--remat', 'block',
             '--json', str(tmp_path / 'rows.json')]
  subprocess.run(command, check=True, cwd=ROOT, env={**env, 'PYTHONPATH': ROOT}, capture_output=True, text=True)
  with open(tmp_path / 'rows.json') as f:
    (r,) = json.load(f)
  assert 'error' not in r, r
  assert r['model'] == 'U-Net (tiny)' and r['remat'] == 'block' and r['batch_per_device'] == 2
  assert r['batch_bytes'] == 16 * 8 * 8 * 3 * 4 // 8 + 4     # unconditional: images and the stop flag
  assert r['arg_bytes'] == r['state_bytes'] + r['batch_bytes'] and 0 < r['kept_bytes'] < r['temp_bytes']
  refused = subprocess.run([*command[:-2], '--blocks', 'scanned'], cwd=ROOT, env={**env, 'PYTHONPATH': ROOT},
                           capture_output=True, text=True)
  assert refused.returncode == 2 and '--blocks scanned is a DiT option' in refused.stderr
