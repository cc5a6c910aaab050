"""Training throughput and MFU of the real presets: the trainer's own jitted step, data on device.

For each (network preset, rule) this builds `fmjax.train.Setup` from the experiment's config
(the same step the training loop runs: donated, sharded state, the config's mesh, EMA,
non-finite guard, dropout where the preset has it) and feeds it one synthetic batch that is
already on the devices, so the step time excludes the input pipeline. Reported per row:

  step ms        median over `--repeats` timed steps after `--warmup` untimed ones, each
                 ended by jax.block_until_ready on the new state
  img/s/device   batch / step time / devices
  model GFLOP    analytic FLOPs of the step (fmjax.models.flops: matmuls, convolutions and
                 attention of forward, backward and jvp, from the network's shapes)
  XLA GFLOP      XLA's cost analysis of the step's unoptimized HLO (a cross-check: on GPU the
                 optimized program's count leaves out cuBLAS GEMMs, the unoptimized one does not); with
                 a remat policy it includes the recomputation, which the model count leaves out;
                 blank for scanned blocks, whose loop body XLA counts once
  MFU            model FLOPs / step time / (devices x peak dense bf16 FLOP/s of the device,
                 fmjax.models.flops.PEAK_BF16); blank where the peak is unknown (CPU)
  temp GiB       XLA's temporary buffer size of the compiled step

Presets (ARG of --model): dit-b2 (DiT-B/2 on 32x32x4 latents, batch 256, bfloat16:
experiments/imagenet256_dit.py), dit-xl2 (DiT-XL/2, same), unet (the CIFAR-10 U-Net, batch
512, bfloat16: experiments/cifar10_unet.py). Rules: flow_matching, lsd, meanflow (omega 1, no
guidance), meanflow+cfg (in-target guidance, the experiment's omega / kappa, or omega 2 for
the unconditional U-Net made 10-class for that row), imf, sct; each with the experiment's
options in force (diagonal fraction, weighting). The FSDP axis of the experiment is cut to
the devices present (gcd).

  python benchmarks/train_throughput.py --model dit-b2 --out runs/tp_dit.md        # accelerator
  python benchmarks/train_throughput.py --model dit-b2 --rules flow_matching,meanflow \
      --attention naive,flash --compile_workers 4                                  # attention rows
  python benchmarks/train_throughput.py --model unet --tiny --repeats 2            # CPU smoke run

Under the table, each rule's step-time ratio to flow matching (same attention) beside its
analytic FLOP ratio: the bound aimed for is a time ratio at most 1.1x the FLOP ratio.

Rows are written to --out as they finish; `--budget_s` skips the rows that would start after
the budget is spent (a partial table instead of none when a device call has a time limit).
`--compile_workers N` compiles every row first, N at a time (a GPU compile of a DiT-B/2 step
took 26-42 s on an H100, one at a time), writes their compile times and memory, then times
them one by one; with JAX_COMPILATION_CACHE_DIR set, a rerun loads the compiled steps.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import math
import os
import sys
import time

import jax
import jax.numpy as jnp

from fmjax import benchmarking, from_config, models, sharding as sharding_lib, train
from fmjax.models import flops as flops_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = ('flow_matching', 'meanflow', 'lsd', 'meanflow+cfg', 'imf', 'sct')
# (experiment file, ARG, example shape, global batch)
PRESETS = {
    'dit-b2': ('imagenet256_dit', 'meanflow,B', (32, 32, 4), 256),
    'dit-xl2': ('imagenet256_dit', 'meanflow,XL', (32, 32, 4), 256),
    'unet': ('cifar10_unet', 'lsd', (32, 32, 3), 512),
}
# --tiny: the same configs with CPU-size networks and inputs.
TINY = {
    'dit': dict(shape=(8, 8, 4), model=dict(hidden=32, depth=2, num_heads=2, patch_size=2,
                                           time_frequency_dim=32)),
    'unet': dict(shape=(8, 8, 3), model=dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                            attn_resolutions=(4,), channels_per_head=8, emb_mult=2)),
}


def experiment_config(name: str, arg: str):
  path = os.path.join(ROOT, 'experiments', f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'experiments_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def rule_config(preset: str, rule: str, *, tiny: bool = False, batch: int = 0, dtype: str = '',
                attention: str = '', size: str = '', remat: str = '', scan_blocks: bool = False):
  """(config, example shape) of one row: the preset's experiment with `rule` in force (and
  `attention`, an implementation of fmjax.models.attention, and `remat`, a block
  rematerialization policy of fmjax.models.remat, when given; `scan_blocks` scans the DiT's blocks,
  config.model.scan_blocks). `size` replaces a
  DiT preset's network size (B, M, L, XL of experiments/imagenet256_dit.py)."""
  experiment, arg, shape, default_batch = PRESETS[preset]
  is_dit = experiment == 'imagenet256_dit'
  base_rule = rule.split('+')[0]
  if is_dit:
    # The DiT experiment defines meanflow and imf; the other rules run on the meanflow config
    # (same network, parameterization and time conditioning).
    size = size or arg.split(',')[1]
    c = experiment_config(experiment, f'{"imf" if base_rule == "imf" else "meanflow"},{size}')
  else:
    c = experiment_config(experiment, base_rule if base_rule in ('lsd', 'meanflow', 'sct') else
                          ('meanflow' if base_rule == 'imf' else 'lsd'))
  with c.unlocked():
    c.loss.name = base_rule
    if base_rule == 'imf' and not is_dit:
      c.loss_defaults.imf = c.loss_defaults.meanflow.to_dict()
    if base_rule in ('meanflow', 'imf'):
      if rule == 'meanflow+cfg':
        if not c.data.num_classes:
          c.data.num_classes = 10     # guidance needs labels: the class-conditional variant
          c.loss.omega = 2.0
      elif rule == 'meanflow':
        c.loss.omega, c.loss.kappa = 1.0, 0.0   # no guidance
    c.train.batch_size = batch or default_batch
    if dtype:
      c.model.dtype = dtype
    if attention:
      c.model.attention = attention
    if remat:
      c.model.remat = remat
    if scan_blocks:
      c.model.scan_blocks = True
    n = jax.device_count()
    c.sharding.fsdp = math.gcd(int(c.sharding.fsdp), n)
    c.sharding.data = -1
    c.optim.warmup_steps = 0          # a nonzero learning rate from the first step
    c.eval.at_end = False
    if tiny:
      family = 'dit' if is_dit else 'unet'
      for key, value in TINY[family]['model'].items():
        c.model[key] = value
      shape = TINY[family]['shape']
  return c, shape


class SyntheticSource:
  """One fixed batch (normal x1, uniform labels) made on the devices in the batch sharding."""

  def __init__(self, config, mesh, example_shape):
    self.example_shape, self.num_classes = tuple(example_shape), int(config.data.num_classes)
    b = config.train.batch_size
    sharding_lib.local_batch_size(b)
    out = sharding_lib.batch_sharding(mesh)

    def make(key):
      batch = {'x1': jax.random.normal(key, (b, *self.example_shape), jnp.float32)}
      if self.num_classes:
        batch['labels'] = jax.random.randint(jax.random.fold_in(key, 1), (b,), 0, self.num_classes)
      return batch

    self._batch = jax.jit(make, out_shardings=out)(jax.random.PRNGKey(config.seed))

  def batch(self, step: int) -> dict:
    del step
    return self._batch

  def get_state(self) -> dict:
    return {}

  def set_state(self, state) -> None:
    del state


def analytic_step_flops(config, example_shape, rule: str) -> float:
  """fmjax.models.flops' count of one step of `config` (the whole global batch)."""
  family, options = config.model.name, from_config.network_options(config)
  module = models.abstract(family, example_shape=tuple(example_shape),
                           num_classes=int(config.data.num_classes),
                           time_conditioning=config.model.time_conditioning,
                           dtype=jnp.dtype(config.model.dtype), **options)
  fwd = flops_lib.forward(module)
  loss = config.loss
  extra = {}
  if rule.split('+')[0] in ('meanflow', 'imf'):
    extra = dict(guidance=(loss.omega != 1.0 or loss.kappa != 0.0), kappa=float(loss.kappa),
                 labels=bool(config.data.num_classes))
  if rule.split('+')[0] == 'imf' and loss.get('guidance_conditioning'):
    extra.update(guidance_conditioning=True,
                 velocity_head=float(loss.get('velocity_head_weight') or 0.0) > 0.0)
  return flops_lib.step_flops(config.loss.name, fwd, config.train.batch_size,
                              float(loss.diagonal_fraction), **extra)


class Row:
  """One (preset, rule, attention, remat, blocks) row in phases: the constructor builds the
  trainer, `lower` lowers its step against the abstract state (no device memory for the state), `compile`
  (thread-safe: XLA compiles outside the GIL, so rows compile in parallel), `time` creates the
  state and times the step."""

  def __init__(self, preset: str, rule: str, *, attention: str = '', remat: str = '', scan_blocks=False,
               tiny=False, batch=0, dtype='', workdir='/tmp/fmjax_throughput', size: str = ''):
    config, self.shape = rule_config(preset, rule, tiny=tiny, batch=batch, dtype=dtype,
                                     attention=attention, size=size, remat=remat,
                                     scan_blocks=scan_blocks)
    self.tiny = tiny
    self.setup = train.Setup(config, workdir,
                             make_source=lambda c, mesh: SyntheticSource(c, mesh, self.shape))
    config = self.setup.config
    self.row = {'preset': preset, 'rule': rule, 'batch': config.train.batch_size,
                'dtype': config.model.dtype, 'diag': float(config.loss.diagonal_fraction),
                'attention': config.model.get('attention') or 'naive',
                'remat': config.model.get('remat') or 'none',
                'blocks': 'scanned' if config.model.get('scan_blocks') else 'unrolled',
                'model_flops': analytic_step_flops(config, self.shape, rule)}
    if config.loss.name == 'imf' and config.loss.get('guidance_conditioning'):
      self.row['guidance'] = (f'omega per row on [1, {config.loss.omega_max:g}]'
                              + (', velocity head' if config.loss.get('velocity_head_weight') else ''))
    elif config.loss.name in ('meanflow', 'imf'):
      self.row['guidance'] = f'omega {config.loss.omega:g}, kappa {config.loss.kappa:g}'
    self.compiled = None

  def lower(self):
    setup = self.setup
    with jax.set_mesh(setup.mesh):
      self.batch = setup.source.batch(0)
      self.stop = sharding_lib.per_device_flags(False, setup.mesh)
      start = time.perf_counter()
      self.lowered = setup.train_step.lower(setup.abstract_state, self.batch, self.stop)
      self.row['lower_s'] = time.perf_counter() - start
    # XLA's cost analysis counts a loop's body once: a scanned step's count leaves out depth - 1
    # blocks, so it is not reported (the model count is the network's either way).
    scanned = self.row['blocks'] == 'scanned'
    self.row['xla_flops'] = float('nan') if scanned else benchmarking.xla_cost(self.lowered)['flops']

  def compile(self):
    start = time.perf_counter()
    # --tiny is a smoke run: compile without backend optimization (seconds, not a minute).
    self.compiled = self.lowered.compile(models.FAST_COMPILE if self.tiny else None)
    self.row['compile_s'] = self.row['lower_s'] + time.perf_counter() - start
    self.row['temp_gib'] = benchmarking.temp_bytes(self.compiled) / 2**30   # NaN: no memory analysis

  def time(self, warmup: int, repeats: int) -> dict:
    setup, compiled, row = self.setup, self.compiled, self.row
    with jax.set_mesh(setup.mesh):
      carried = {'state': setup.init_state()}

      def step():   # the next step on the state the last one returned (donated), waited for
        carried['state'], carried['metrics'] = compiled(carried['state'], self.batch, self.stop)
        return carried['state']

      timing = benchmarking.time_calls(step, repeats=repeats, warmup=warmup)
      row['loss'] = float(jax.device_get(carried['metrics']['loss']))
    del carried
    self.compiled = self.lowered = None   # free the executable before the next row
    n = jax.device_count()
    row['step_s'] = timing.median_s
    row['img_s_device'] = row['batch'] / row['step_s'] / n
    peak = flops_lib.peak_bf16_flops(jax.devices()[0].device_kind)
    row['mfu'] = row['model_flops'] / row['step_s'] / (peak * n) if peak else float('nan')
    return row


def measure(preset: str, rule: str, *, attention='', remat='', scan_blocks=False, tiny=False, batch=0,
            dtype='', warmup=2, repeats=10, workdir='/tmp/fmjax_throughput') -> dict:
  """One row, compiled and timed on its own."""
  r = Row(preset, rule, attention=attention, remat=remat, scan_blocks=scan_blocks, tiny=tiny, batch=batch,
          dtype=dtype, workdir=workdir)
  r.lower()
  r.compile()
  return r.time(warmup, repeats)


def _error_row(preset, rule, attention, remat, scanned, e) -> dict:
  message = ' '.join(str(e).split())[:160].replace('|', '/')
  return {'preset': preset, 'rule': rule, 'attention': attention or '', 'remat': remat or '',
          'blocks': 'scanned' if scanned else '', 'error': f'{type(e).__name__}: {message}'}


COLUMNS = ('network', 'rule', 'attention', 'remat', 'blocks', 'batch', 'dtype', 'diagonal', 'step ms',
           'img/s/device', 'model GFLOP', 'XLA GFLOP', 'model/XLA', 'MFU', 'temp GiB', 'compile s', 'note')
HEADER = benchmarking.markdown_row(COLUMNS)


def format_row(r: dict) -> str:
  return benchmarking.markdown_row(row_cells(r))


def row_cells(r: dict) -> list[str]:
  """The table's cells of one row: measured, compiled but not timed, or failed / skipped."""
  if 'error' in r:
    return ([r['preset'], r['rule'], r.get('attention', ''), r.get('remat', ''), r.get('blocks', ''),
             r.get('batch', '')] + [''] * (len(COLUMNS) - 7) + [r['error']])
  timed = 'step_s' in r
  mfu = '' if not timed or math.isnan(r['mfu']) else f"{100 * r['mfu']:.1f} %"
  step = f"{1e3 * r['step_s']:.1f}" if timed else ''
  per_device = f"{r['img_s_device']:.1f}" if timed else ''
  note = r.get('guidance', '') if timed else 'compiled, not timed'
  counted = not math.isnan(r['xla_flops'])   # blank for scanned blocks
  return [r['preset'], r['rule'], r['attention'], r.get('remat', 'none'), r.get('blocks', 'unrolled'),
          r['batch'], r['dtype'], f"{r['diag']:g}", step, per_device, f"{r['model_flops'] / 1e9:.4g}",
          f"{r['xla_flops'] / 1e9:.4g}" if counted else '',
          f"{r['model_flops'] / r['xla_flops']:.3f}" if counted else '', mfu, f"{r['temp_gib']:.2f}",
          f"{r['compile_s']:.0f}", note]


def ratios(rows) -> list[str]:
  """Each timed rule against flow matching with the same attention, remat policy and blocks: the
  time ratio, the analytic FLOP ratio, and their quotient (the bound aimed for: at most 1.1). A
  remat policy's recomputation is not in the analytic count (model FLOPs, as MFU counts them).
  Then each policy's step time against the same rule and attention without remat, and scanned
  blocks against unrolled ones."""
  timed = [r for r in rows if r is not None and 'step_s' in r]
  scanned = lambda r: r.get('blocks', 'unrolled') == 'scanned'
  variant = lambda r: (r['attention'], r.get('remat', 'none'), scanned(r))
  base = {variant(r): r for r in timed if r['rule'] == 'flow_matching'}
  lines = []
  for r in timed:
    b = base.get(variant(r))
    if b is None or r is b:
      continue
    time_ratio, flop_ratio = r['step_s'] / b['step_s'], r['model_flops'] / b['model_flops']
    policy = '' if r.get('remat', 'none') == 'none' else f", remat {r['remat']}"
    policy += ', scanned' if scanned(r) else ''
    lines.append(f"- {r['rule']} ({r['attention']} attention{policy}) / flow matching: time "
                 f"{time_ratio:.3f}, FLOPs {flop_ratio:.3f}, time / FLOP ratio "
                 f"{time_ratio / flop_ratio:.3f}")
  plain = {(r['rule'], r['attention'], scanned(r)): r for r in timed if r.get('remat', 'none') == 'none'}
  for r in timed:
    b = plain.get((r['rule'], r['attention'], scanned(r)))
    if b is None or r is b:
      continue
    lines.append(f"- {r['rule']} ({r['attention']} attention{', scanned' if scanned(r) else ''}) with remat "
                 f"{r['remat']} / without: time {r['step_s'] / b['step_s']:.3f}, temp GiB {r['temp_gib']:.2f} "
                 f"against {b['temp_gib']:.2f}")
  unrolled = {(r['rule'], r['attention'], r.get('remat', 'none')): r for r in timed if not scanned(r)}
  for r in timed:
    b = unrolled.get((r['rule'], r['attention'], r.get('remat', 'none')))
    if b is None or not scanned(r):
      continue
    lines.append(f"- {r['rule']} ({r['attention']} attention, remat {r.get('remat', 'none')}) scanned / "
                 f"unrolled blocks: time {r['step_s'] / b['step_s']:.3f}, compile s {r['compile_s']:.0f} "
                 f"against {b['compile_s']:.0f}, temp GiB {r['temp_gib']:.2f} against {b['temp_gib']:.2f}")
  return lines


def table(rows) -> str:
  rows = [r for r in rows if r is not None]
  device = jax.devices()[0]
  peak = flops_lib.peak_bf16_flops(device.device_kind)
  peak_text = f'{peak / 1e12:.1f} TFLOP/s dense bf16 per device' if peak else 'peak unknown: no MFU'
  lines = [f'Training step throughput on {jax.device_count()} x {device.device_kind} ({device.platform}), '
           f'jax {jax.__version__}; MFU against {peak_text} (fmjax.models.flops.PEAK_BF16). '
           'Step: fmjax.train.Setup\'s jitted step, synthetic batch on device; median of the timed repeats.',
           '', benchmarking.markdown_table(COLUMNS, [row_cells(r) for r in rows])]
  extra = ratios(rows)
  return '\n'.join(lines + ([''] + extra if extra else [])) + '\n'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default='dit-b2', choices=sorted(PRESETS))
  parser.add_argument('--rules', default=','.join(RULES), help=f'comma-separated, of {RULES}')
  parser.add_argument('--attention', default='',
                      help='comma-separated attention implementations, a row each (default: the '
                           "preset's); e.g. naive,flash (flash: cuDNN forward on GPU)")
  parser.add_argument('--remat', default='',
                      help='comma-separated block remat policies (DiT or U-Net), a row each (default: the '
                           "preset's, none); e.g. none,dots,block")
  parser.add_argument('--blocks', default='unrolled',
                      help="comma-separated, a row each: the DiT blocks 'unrolled' (one compiled copy "
                           "each) or 'scanned' (one body, config.model.scan_blocks)")
  parser.add_argument('--batch', type=int, default=0, help='global batch (0: the preset\'s)')
  parser.add_argument('--dtype', default='', help='compute dtype (default: the experiment\'s, bfloat16)')
  parser.add_argument('--tiny', action='store_true', help='CPU-size network and inputs (smoke test)')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--budget_s', type=float, default=0.0, help='skip rows that would start later')
  parser.add_argument('--compile_workers', type=int, default=1,
                      help='>1: compile every row first, this many at a time (XLA compiles outside '
                           'the GIL), then time them one by one; 1: compile and time row by row')
  parser.add_argument('--out', default='')
  args = parser.parse_args(argv)
  rules = [r for r in args.rules.split(',') if r]
  unknown = sorted(set(rules) - set(RULES))
  if unknown:
    parser.error(f'unknown rule(s) {unknown}; choose from {RULES}.')
  attentions = [a for a in args.attention.split(',') if a] or ['']
  from fmjax.models import attention as attention_lib
  unknown = sorted(set(attentions) - set(attention_lib.ATTENTION_IMPLEMENTATIONS) - {''})
  if unknown:
    parser.error(f'unknown attention {unknown}; choose from {attention_lib.ATTENTION_IMPLEMENTATIONS}.')
  remats = [m for m in args.remat.split(',') if m] or ['']
  from fmjax.models import remat as remat_lib   # pylint: disable=import-outside-toplevel
  unknown = sorted(set(remats) - set(remat_lib.REMAT_POLICIES) - {''})
  if unknown:
    parser.error(f'unknown remat {unknown}; choose from {tuple(remat_lib.REMAT_POLICIES)}.')
  blocks = [b for b in args.blocks.split(',') if b]
  if set(blocks) - {'unrolled', 'scanned'}:
    parser.error(f"unknown blocks {sorted(set(blocks) - {'unrolled', 'scanned'})}; choose from "
                 'unrolled, scanned.')
  specs = [(rule, attention, remat, b == 'scanned') for rule in rules for attention in attentions
           for remat in remats for b in blocks]
  options = dict(tiny=args.tiny, batch=args.batch, dtype=args.dtype)
  start, rows = time.perf_counter(), [None] * len(specs)

  def write(i):
    print(format_row(rows[i]), file=sys.stderr, flush=True)
    if args.out:
      with open(args.out, 'w') as f:
        f.write(table([r for r in rows if r is not None]))

  def spent():
    return args.budget_s and time.perf_counter() - start > args.budget_s

  def skipped(rule, attention, remat, scanned):
    return {'preset': args.model, 'rule': rule, 'attention': attention, 'remat': remat,
            'blocks': 'scanned' if scanned else '', 'error': f'skipped: --budget_s {args.budget_s:g} spent'}

  if args.compile_workers <= 1:
    for i, (rule, attention, remat, scanned) in enumerate(specs):
      try:
        rows[i] = (skipped(*specs[i]) if spent() else
                   measure(args.model, rule, attention=attention, remat=remat, scan_blocks=scanned,
                           warmup=args.warmup, repeats=args.repeats, **options))
      except Exception as e:   # e.g. out of memory: keep the other rows
        rows[i] = _error_row(args.model, *specs[i], e)
      write(i)
  else:
    # Compile everything before timing anything: XLA:GPU autotunes on the device while it
    # compiles, which would disturb a step being timed.
    prepared = {}
    for i, (rule, attention, remat, scanned) in enumerate(specs):
      try:
        prepared[i] = Row(args.model, rule, attention=attention, remat=remat, scan_blocks=scanned,
                          **options)
        prepared[i].lower()
      except Exception as e:
        rows[i] = _error_row(args.model, *specs[i], e)
        prepared.pop(i, None)
    with concurrent.futures.ThreadPoolExecutor(args.compile_workers) as pool:
      futures = {i: pool.submit(r.compile) for i, r in prepared.items()}
      for i, future in futures.items():
        try:
          future.result()
          rows[i] = prepared[i].row
        except Exception as e:
          rows[i] = _error_row(args.model, *specs[i], e)
          prepared.pop(i)
        write(i)   # compile times and memory first: they survive a cut-off timing phase
    for i, r in prepared.items():
      try:
        rows[i] = skipped(*specs[i]) if spent() else r.time(args.warmup, args.repeats)
      except Exception as e:
        rows[i] = _error_row(args.model, *specs[i], e)
      write(i)
  print(table(rows))
  return rows


if __name__ == '__main__':
  main()
