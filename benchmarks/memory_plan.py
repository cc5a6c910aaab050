r"""Pod-scale memory plan without a pod: each device's memory for the trainer's DiT step under
FSDP and data parallelism, from XLA's memory analysis of the step compiled for N fake CPU devices.

The step is the trainer's own (`fmjax.train.Setup`: the experiment's config, donated and sharded
state, EMA, the non-finite guard), lowered against the abstract state and compiled, never run:
nothing of the state is allocated, so DiT-XL/2 plans fit on a laptop. Per row:

  state GiB     parameters + Adam moments + EMA copies on one device, summed from each array's
                shard shape under its sharding (the FSDP size rule of fmjax.sharding): exact
  XLA args GiB  XLA's argument size of the per-device program (state + batch shard): a
                cross-check of the line above
  temp GiB      XLA's temporary buffers of the per-device program (activations kept for the
                backward pass, jvp tangents, gradients, fusion scratch)
  peak GiB      args + outputs not aliased to the donated arguments + temp
  kept GiB      the activations the loss keeps from its forward pass (and jvp) for the backward,
                per device: what a rematerialization policy (--remat) controls. From the
                jaxpr (fmjax.benchmarking.saved_residual_bytes), so the same on every backend:
                traced at the global batch and at half of it, the per-example part split over
                the devices and the rest (parameter-sized values) counted whole
  fits          the chip classes whose HBM holds peak with 10 % to spare

Caveat, measured nowhere else: the plan is compiled by the CPU backend. State and argument bytes
are the same on any backend; temporaries are not (TPU and GPU compilers fuse and rematerialize
differently, pad to their tile layouts, and a real run adds runtime buffers), so `temp` is an
estimate of the order, not a promise: confirm the rows that fit narrowly on the device.

  python benchmarks/memory_plan.py --devices 8 --meshes 8x1,1x8 --rules meanflow,imf,lsd --size XL
  python benchmarks/memory_plan.py --devices 64 --meshes 64x1,8x8,1x64 --rules meanflow,imf --size XL
  python benchmarks/memory_plan.py --devices 64 --meshes 8x8 --rules lsd --size B,M,L,XL   # largest LSD DiT
  python benchmarks/memory_plan.py --devices 8 --meshes 1x8 --rules lsd --size XL --remat none,dots,block --schedule memory
  python benchmarks/memory_plan.py --devices 8 --meshes 8x1 --rules imf --size XL --microbatches 4   # iMF's batch on 8 chips
  python benchmarks/memory_plan.py --devices 64 --meshes 8x8,1x64 --rules lsd,imf --size XL --blocks scanned --remat block
  python benchmarks/memory_plan.py --devices 8 --meshes 8x1 --rules lsd,sct --size unet --remat none,dots,block
  python benchmarks/memory_plan.py --tiny --devices 8 --meshes 8x1,1x8 --rules lsd       # CI size (seconds)

Meshes are DATAxFSDP (their product is --devices). --microbatches k plans an update
accumulated over k passes of batch/k (config.train.microbatches). --remat gives the DiT blocks'
rematerialization policies (config.model.remat: none, dots, block; fmjax.models.remat), a row
each; --blocks unrolled,scanned plans the DiT with its blocks unrolled and scanned
(config.model.scan_blocks: one compiled block body, compiled in seconds), a row each. Batches:
the experiments' global batches (MeanFlow and LSD 256, iMF 1024), or --batch. --size unet plans
the CIFAR-10 U-Net of experiments/cifar10_unet.py instead (batch 512; remat applies to its
residual blocks; --blocks does not).
Rows print as they finish; --out writes the Markdown table, --json the rows.
"""

from __future__ import annotations

import os
import subprocess
import sys

# XLA:CPU orders a program's instructions for parallelism by default, which can run a
# recomputed block's forward early and keep it: the compiled program then holds what
# jax.checkpoint was asked to drop. Its memory-minimizing schedule honours remat better
# (DiT-XL/2 MeanFlow, 8 x 1, 32 examples per device: 19.6 GiB of temporaries under 'block'
# against 30.7 without remat) but is not better everywhere: on FSDP steps it kept more (DiT-XL/2
# LSD, 1 x 8: 51.3 GiB against 37.8). --schedule memory asks for it (where this jaxlib has the
# flag); the default is XLA:CPU's own. docs/bench/memory_plan_cpu.md has both.
MEMORY_SCHEDULE_FLAG = '--xla_cpu_enable_concurrency_optimized_scheduler=false'


def _flag_known(flag: str) -> bool:
  """Whether this jaxlib's XLA accepts `flag` (an unknown XLA_FLAGS entry aborts the process,
  so a child process tries it)."""
  env = {**os.environ, 'XLA_FLAGS': flag, 'JAX_PLATFORMS': 'cpu'}
  probe = subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'], env=env,
                         capture_output=True, check=False)
  return probe.returncode == 0


def _option(argv, name: str, default: str) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      return arg.split('=', 1)[1]
    if arg == f'--{name}' and i + 1 < len(argv):
      return argv[i + 1]
  return default


def _fake_devices(argv) -> int:
  """--devices N and --schedule, read before jax is imported: the CPU backend then shows N
  devices and schedules as asked."""
  n = int(_option(argv, 'devices', '8'))
  flags = f' --xla_force_host_platform_device_count={n}'
  os.environ['FMJAX_MEMORY_PLAN_SCHEDULE'] = 'concurrency'
  if _option(argv, 'schedule', 'concurrency') == 'memory' and _flag_known(MEMORY_SCHEDULE_FLAG):
    flags += ' ' + MEMORY_SCHEDULE_FLAG
    os.environ['FMJAX_MEMORY_PLAN_SCHEDULE'] = 'memory'
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + flags).strip()
  os.environ['JAX_PLATFORMS'] = 'cpu'
  return n


if __name__ == '__main__':
  _fake_devices(sys.argv[1:])

# pylint: disable=wrong-import-position
import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fmjax import benchmarking, models, sharding as sharding_lib, train  # noqa: E402
from fmjax.models import remat as remat_lib  # noqa: E402
import train_throughput as throughput  # noqa: E402

GIB = 2**30
# HBM per chip, GiB (vendors' specifications).
CHIPS = {'TPU v5e': 16, 'TPU v4': 32, 'TPU v6e': 32, 'H100': 80, 'TPU v5p': 95, 'H200': 141}
HEADROOM = 0.9          # a row fits a chip when peak <= 90 % of its HBM
BATCH = {'meanflow': 256, 'lsd': 256, 'imf': 1024}   # the experiments' global batches
UNET = 'unet'                                         # --size: the CIFAR-10 U-Net preset
TINY_FSDP_MIN_SIZE = 2**8   # --tiny: shard the tiny network's arrays too, as the large ones are


def parse_mesh(text: str, devices: int) -> tuple[int, int]:
  data, fsdp = (int(v) for v in text.lower().split('x'))
  if data * fsdp != devices:
    raise ValueError(f'mesh {text}: DATA x FSDP = {data * fsdp}, not the {devices} devices.')
  return data, fsdp


def shard_bytes(abstract_tree) -> int:
  """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def kept_bytes_per_device(rule, abstract_params, batch, devices: int, microbatches: int = 1) -> float:
  """The bytes the loss keeps for its backward pass on one device (see the module docstring):
  traced at the pass's batch B (the global batch over `microbatches`) and at B/2, the
  difference is the part that grows with the batch, split over `devices`; the rest is counted
  whole."""
  key = jax.random.PRNGKey(0)
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params)
  loss = lambda p, b: rule(p, b, key)[0]
  size = jax.tree.leaves(batch)[0].shape[0] // microbatches
  traced = {}
  for n in (size, size // 2):
    sliced = jax.tree.map(lambda a: jax.ShapeDtypeStruct((n, *a.shape[1:]), a.dtype), batch)
    traced[n] = benchmarking.saved_residual_bytes(loss, params, sliced)
  per_example = (traced[size] - traced[size // 2]) / (size - size // 2)
  fixed = traced[size] - per_example * size
  return fixed + per_example * size / devices


def fits(peak_bytes: float) -> list[str]:
  return [name for name, gib in CHIPS.items() if peak_bytes <= HEADROOM * gib * GIB]


def plan_row(size: str, rule: str, mesh: tuple[int, int], *, batch: int = 0, tiny: bool = False,
             remat: str = 'none', microbatches: int = 1, scan_blocks: bool = False,
             workdir: str = '/tmp/fmjax_memory_plan') -> dict:
  """One row: the step of the DiT-SIZE/2 experiment (size 'unet': the CIFAR-10 U-Net's) with
  `rule`, on a DATA x FSDP mesh, its blocks rematerialized under the policy `remat` (and scanned,
  with `scan_blocks`), each update accumulated over `microbatches` passes."""
  if size == UNET:
    preset, default_batch = UNET, throughput.PRESETS[UNET][3]
  else:
    preset, default_batch = f'dit-{size}', BATCH.get(rule, 256)
    throughput.PRESETS.setdefault(preset, ('imagenet256_dit', f'meanflow,{size}', (32, 32, 4), 256))
  batch = batch or default_batch
  config, shape = throughput.rule_config(preset, rule, tiny=tiny, batch=batch, remat=remat,
                                         scan_blocks=scan_blocks)
  with config.unlocked():
    config.sharding.data, config.sharding.fsdp = mesh
    config.train.microbatches = microbatches
    if tiny:
      config.sharding.fsdp_min_size = TINY_FSDP_MIN_SIZE
  setup = train.Setup(config, workdir,
                      make_source=lambda c, m: throughput.SyntheticSource(c, m, shape))
  start = time.perf_counter()
  with jax.set_mesh(setup.mesh):
    batch_arrays = setup.source.batch(0)
    stop = sharding_lib.per_device_flags(False, setup.mesh)
    lowered = setup.train_step.lower(setup.abstract_state, batch_arrays, stop)
    kept = kept_bytes_per_device(setup.rule, setup.abstract_state['params'], batch_arrays,
                                 mesh[0] * mesh[1], microbatches)
  compiled = lowered.compile(models.FAST_COMPILE if tiny else None)
  memory = compiled.memory_analysis()
  params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(setup.abstract_state['params']))
  args, out = memory.argument_size_in_bytes, memory.output_size_in_bytes
  alias, temp = memory.alias_size_in_bytes, memory.temp_size_in_bytes
  peak = args + out - alias + temp
  return {'model': model_name(size, tiny, scan_blocks), 'rule': rule, 'scan_blocks': scan_blocks,
          'mesh': f'{mesh[0]}x{mesh[1]}', 'remat': remat, 'microbatches': microbatches,
          'batch': int(setup.config.train.batch_size),
          'batch_per_device': int(setup.config.train.batch_size) // (mesh[0] * mesh[1]),
          'params_m': params / 1e6, 'dtype': setup.config.model.dtype,
          'state_bytes': shard_bytes(setup.abstract_state),
          'batch_bytes': shard_bytes({'b': batch_arrays, 'stop': stop}),
          'arg_bytes': args, 'out_bytes': out, 'alias_bytes': alias, 'temp_bytes': temp,
          'peak_bytes': peak, 'kept_bytes': kept, 'fits': fits(peak),
          'compile_s': time.perf_counter() - start, 'schedule': os.environ.get('FMJAX_MEMORY_PLAN_SCHEDULE', 'concurrency')}


def model_name(size: str, tiny: bool, scan_blocks: bool) -> str:
  if size == UNET:
    return 'U-Net (CIFAR-10)' if not tiny else 'U-Net (tiny)'
  return (f'DiT-{size}/2' if not tiny else 'DiT (tiny)') + (', scanned' if scan_blocks else '')


HEADER = ('model', 'rule', 'mesh DATAxFSDP', 'remat', 'batch (per device)', 'params M', 'state GiB',
          'XLA args GiB', 'temp GiB', 'peak GiB', 'kept GiB', 'fits (<= 90 % of HBM)', 'compile s')


def cells(r: dict) -> list[str]:
  if 'error' in r:
    lead = [r['model'], r['rule'], r['mesh'], r.get('remat', 'none')]
    return lead + [''] * (len(HEADER) - len(lead) - 2) + [r['error'], '']
  k = r.get('microbatches', 1)
  per_device = f"{r['batch_per_device']}" + (f" = {k} x {r['batch_per_device'] // k}" if k > 1 else '')
  return [r['model'], r['rule'], r['mesh'], r.get('remat', 'none'), f"{r['batch']} ({per_device})",
          f"{r['params_m']:.0f}", f"{r['state_bytes'] / GIB:.2f}", f"{r['arg_bytes'] / GIB:.2f}",
          f"{r['temp_bytes'] / GIB:.2f}", f"{r['peak_bytes'] / GIB:.2f}",
          f"{r['kept_bytes'] / GIB:.2f}" if 'kept_bytes' in r else '',
          ', '.join(r['fits']) or 'none', f"{r['compile_s']:.0f}"]


def largest_per_chip(rows: list[dict], rule: str = 'lsd') -> dict[str, str]:
  """For each chip class: the largest model (by parameters) whose `rule` row fits it."""
  best = {}
  for r in sorted((r for r in rows if r.get('rule') == rule and 'error' not in r),
                  key=lambda r: r['params_m']):
    for chip in r['fits']:
      remat = r.get('remat', 'none')
      policy = '' if remat == 'none' else f', remat {remat}'
      best[chip] = f"{r['model']} ({r['mesh']}, batch {r['batch']}{policy})"
  return {chip: best.get(chip, 'none') for chip in CHIPS}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--devices', type=int, default=8, help='fake CPU devices (set before jax starts)')
  parser.add_argument('--meshes', default='8x1,1x8', help='DATAxFSDP,... (products = --devices)')
  parser.add_argument('--rules', default='meanflow,imf,lsd')
  parser.add_argument('--size', default='XL', help='DiT sizes of experiments/imagenet256_dit.py: '
                      "B,M,L,XL; or 'unet', the CIFAR-10 U-Net of experiments/cifar10_unet.py")
  parser.add_argument('--batch', type=int, default=0, help='global batch (0: the experiment\'s)')
  parser.add_argument('--schedule', default='concurrency', choices=('concurrency', 'memory'),
                      help="XLA:CPU's instruction schedule: its default (for parallelism) or the "
                           'memory-minimizing one, which honours remat (compare policies with it)')
  parser.add_argument('--microbatches', type=int, default=1,
                      help='gradient accumulation: each update in this many passes (config.train.microbatches)')
  parser.add_argument('--remat', default='none', help='DiT block remat policies, a row each: none,dots,block')
  parser.add_argument('--blocks', default='unrolled',
                      help="the DiT blocks compiled 'unrolled' (one copy each) or 'scanned' (one "
                           'body, config.model.scan_blocks), a row each: unrolled,scanned')
  parser.add_argument('--tiny', action='store_true', help='the tiny DiT, fast compile: a smoke run')
  parser.add_argument('--out', default='', help='Markdown table')
  parser.add_argument('--json', default='', help='the rows as JSON')
  args = parser.parse_args(argv)
  if jax.device_count() != args.devices:
    sys.exit(f'memory_plan: jax sees {jax.device_count()} devices, not --devices={args.devices} '
             '(run it as a script, so that it sets XLA_FLAGS before jax starts).')
  meshes = [parse_mesh(m, args.devices) for m in args.meshes.split(',')]
  remats = args.remat.split(',')
  unknown = sorted(set(remats) - set(remat_lib.REMAT_POLICIES))
  if unknown:
    parser.error(f'unknown --remat {unknown}; choose from {tuple(remat_lib.REMAT_POLICIES)}.')
  blocks = args.blocks.split(',')
  if set(blocks) - {'unrolled', 'scanned'}:
    parser.error(f"unknown --blocks {sorted(set(blocks) - {'unrolled', 'scanned'})}; choose from unrolled, scanned.")
  if UNET in args.size.split(',') and 'scanned' in blocks:
    parser.error('--blocks scanned is a DiT option; plan --size unet with its blocks unrolled.')
  rows = []
  print(benchmarking.markdown_table(HEADER, []), flush=True)
  for size in args.size.split(','):
    for rule in args.rules.split(','):
      for mesh in meshes:
        for remat, scanned in [(r, b == 'scanned') for r in remats for b in blocks]:
          try:
            row = plan_row(size, rule, mesh, batch=args.batch, tiny=args.tiny, remat=remat,
                           microbatches=args.microbatches, scan_blocks=scanned)
          except Exception as e:   # noqa: BLE001 -- a row that cannot compile is reported, not fatal
            row = {'model': model_name(size, args.tiny, scanned), 'rule': rule,
                   'mesh': f'{mesh[0]}x{mesh[1]}', 'remat': remat,
                   'error': f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"}
          rows.append(row)
          print(benchmarking.markdown_row(cells(row)), flush=True)
  schedule = os.environ.get('FMJAX_MEMORY_PLAN_SCHEDULE', 'concurrency')
  if schedule != args.schedule:
    print(f'memory_plan: this XLA:CPU does not take {MEMORY_SCHEDULE_FLAG}: its default '
          '(concurrency) schedule; remat rows keep more temporaries than a device would.', file=sys.stderr)
  elif schedule == 'concurrency' and set(remats) - {'none'} and 'unrolled' in blocks:   # a scan honours remat
    print('memory_plan: XLA:CPU\'s default schedule keeps most of what remat drops; compare '
          'policies with --schedule memory (and the kept column, which no schedule changes).', file=sys.stderr)
  text = [f'{args.devices} fake CPU devices (jax {jax.__version__}, XLA:CPU {schedule} schedule); peak = '
          'args + outputs not aliased + temp, per device.', '', benchmarking.markdown_table(HEADER, [cells(r) for r in rows])]
  dit_rows = [r for r in rows if r['model'].startswith('DiT')]
  if any(r.get('rule') == 'lsd' for r in dit_rows):
    text += ['', 'Largest DiT whose LSD step fits, per chip class:', '']
    text += [benchmarking.markdown_table(('chip', 'HBM GiB', 'largest LSD DiT'),
                                         [[c, str(CHIPS[c]), m] for c, m in largest_per_chip(dit_rows).items()])]
  if args.out:
    benchmarking.write(args.out, '\n'.join(text) + '\n')
  if args.json:
    benchmarking.write(args.json, json.dumps(rows, indent=1) + '\n')
  return rows


if __name__ == '__main__':
  main()
