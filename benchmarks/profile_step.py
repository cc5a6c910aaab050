"""Where a training step's time goes: time, FLOPs and bytes per class of XLA operation.

The step is the trainer's own (`fmjax.train.Setup`'s jitted, donated, sharded update, built
by benchmarks/train_throughput.py with a synthetic batch already on the devices). It is
compiled, run once, then run `--steps` times under `jax.profiler.trace`; the trace's XLA
events (each names the HLO instruction it executed: the `hlo_op` stat) give the time per
instruction, read with `jax.profiler.ProfileData` (no TensorBoard plugin needed). FLOPs and
bytes per instruction come from the compiled program's HLO text (`compiled.as_text()`), by
the count in `instruction_cost`; XLA's own total (`compiled.cost_analysis()`) is printed
beside it as a cross-check.

Classes (`classify`), for each executed instruction (a fusion by what it contains):
  matmul/conv     dot, convolution, cuBLAS GEMM custom calls (outside attention)
  attention       anything traced from fmjax/models/attention.py or flash_jvp.py (or under a
                  named scope with 'attention' in it; the cuDNN / Pallas attention kernels);
                  without source information, a fusion with exp and a reduction (the softmax)
  norm/modulation layer norm and RMSNorm (flax's normalization module, or an rsqrt where no
                  source is known) and the DiT's adaLN `modulate`
  elementwise     the remaining arithmetic fusions and reductions (activations, residual adds,
                  the loss, the optimizer update)
  layout/copy     copy, transpose, broadcast, concatenate, slice, pad, dynamic-update-slice
  collective      all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute
  other           control flow (while: its own time beyond its body's), custom calls not
                  named above, random bits, sort, gather / scatter

Shares: of the summed per-instruction time (per device and step; threads add up, so on a
parallel CPU the sum can exceed the wall time, and a collective's time includes waiting for
the other devices), of the FLOPs and of the bytes accessed (operands plus result of each
executed instruction: the memory traffic of a fusion, not of its insides). FLOPs and bytes
are those of one device's program (with several devices XLA compiles one SPMD program).
Intensity = FLOPs / bytes per class. Where the trace has no XLA events (`--time_source
cost_model`, or a profiler that records none), the time column is a roofline estimate,
max(FLOPs / peak, bytes / bandwidth) per instruction, and the header says so. On GPU, XLA
may replay kernels as CUDA graphs (command buffers), which the trace does not attribute to
instructions; if a GPU table says ESTIMATE, rerun with XLA_FLAGS=--xla_gpu_enable_command_buffer=
(an empty list: no command buffers).

Below the class table, the same time by source line (`site`: the Python line each executed
instruction was traced from, a fusion by its root, e.g. `dit.py:LINE DiTBlock.__call__` for the
line of the MLP's GELU): what a class lumps together, told apart by the code that made it.

  python benchmarks/profile_step.py --model dit --size tiny --batch 8            # CPU, seconds
  python benchmarks/profile_step.py --model dit --size B --rule meanflow --out runs/prof.json
  python benchmarks/profile_step.py --size tiny --devices 4    # 4 fake CPU devices: collectives
  python benchmarks/profile_step.py --size tiny --blocks scanned --remat block   # scanned DiT blocks
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time

CLASSES = ('matmul/conv', 'attention', 'norm/modulation', 'elementwise', 'layout/copy', 'collective',
           'other')

# ---------------------------------------------------------------------------------------
# HLO text parsing

_DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2,
                'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
                'c128': 16, 'token': 0, 's2': 0.25, 'u2': 0.25}   # f8e*: 1 (the default), f4e*: below
_ARRAY = re.compile(r'\b(pred|token|bf16|f8e\w+|f4e\w+|[subfc]\d+)\[([\d,]*)\]')
_COMPUTATION = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$')
_CALLS = re.compile(r'\b(?:calls|to_apply|body|condition|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)')
_FRAME_ID = re.compile(r'stack_frame_id=(\d+)')
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')

BOOKKEEPING = {'parameter', 'constant', 'tuple', 'get-tuple-element', 'after-all', 'bitcast',
               'opt-barrier', 'add-dependency'}
LAYOUT = {'copy', 'copy-start', 'copy-done', 'transpose', 'reshape', 'broadcast', 'concatenate',
          'slice', 'dynamic-slice', 'dynamic-update-slice', 'pad', 'reverse'}
COLLECTIVE_PREFIXES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
                       'collective-permute', 'collective-broadcast', 'ragged-all-to-all')
CONTROL = {'while', 'conditional', 'call', 'async-start', 'async-done', 'async-update'}
OTHER = {'rng', 'rng-bit-generator', 'rng-get-and-update-state', 'sort', 'gather', 'scatter',
         'custom-call', 'infeed', 'outfeed', 'send', 'recv', 'send-done', 'recv-done', 'fft',
         'triangular-solve', 'cholesky', 'iota', 'partition-id', 'replica-id'}
MATMUL = {'dot', 'convolution'}
ZERO_FLOP = BOOKKEEPING | LAYOUT | CONTROL | {'iota', 'gather', 'scatter', 'select', 'compare',
                                              'convert', 'rng-bit-generator', 'custom-call',
                                              'partition-id', 'replica-id'}


@dataclasses.dataclass
class Instruction:
  """One HLO instruction: its result shape text, opcode, operand names, attributes text."""
  name: str
  shape: str
  opcode: str
  operands: list
  attrs: str
  calls: list = dataclasses.field(default_factory=list)
  source: tuple = ('', '')    # (file, function) of the innermost traced Python frame
  op_name: str = ''
  line: int = 0               # that frame's line


@dataclasses.dataclass
class HloModule:
  name: str
  entry: str
  computations: dict          # name -> list[Instruction]
  frames: dict                # stack_frame_id -> (file, function)

  def shapes(self, computation: str) -> dict:
    return {i.name: i.shape for i in self.computations[computation]}


def _matching(text: str, start: int) -> int:
  """Index just past the bracket that closes the one at text[start]."""
  pairs = {'(': ')', '{': '}', '[': ']'}
  stack = []
  for i in range(start, len(text)):
    c = text[i]
    if c in pairs:
      stack.append(pairs[c])
    elif stack and c == stack[-1]:
      stack.pop()
      if not stack:
        return i + 1
  raise ValueError(f'Unbalanced brackets in HLO line: {text[:120]!r}')


def parse_instruction(line: str) -> Instruction | None:
  """An `Instruction` from one line of HLO text, or None for a line that is not one."""
  line = line.strip()
  if line.startswith('ROOT '):
    line = line[5:]
  if ' = ' not in line or not (line.startswith('%') or re.match(r'[\w.\-]+ = ', line)):
    return None
  name, rest = line.split(' = ', 1)
  name = name.lstrip('%')
  if rest.startswith('('):
    end = _matching(rest, 0)
  else:
    end = rest.find(' ')
    brace = rest.find('{')
    if brace != -1 and brace < end:   # a layout: f32[2,3]{1,0}
      end = _matching(rest, brace)
  shape, rest = rest[:end], rest[end:].lstrip()
  match = re.match(r'([\w\-]+)\(', rest)
  if not match:
    return None
  opcode = match.group(1)
  close = _matching(rest, match.end() - 1)
  operands = [o.strip().split(' ')[-1].lstrip('%') for o in rest[match.end():close - 1].split(',')
              if o.strip()]
  attrs = rest[close:]
  calls = []
  for group in _CALLS.findall(attrs):
    calls += [c.strip().lstrip('%') for c in group.strip('{}').split(',') if c.strip()]
  op_name = _OP_NAME.search(attrs)
  return Instruction(name, shape, opcode, operands, attrs, calls,
                     op_name=op_name.group(1) if op_name else '')


def _frame_table(lines) -> dict:
  """stack_frame_id -> (file, function, line) from the FileNames / FunctionNames / FileLocations /
  StackFrames tables that open a jax-printed HLO module (the innermost frame only)."""
  tables, current = collections.defaultdict(dict), None
  for line in lines:
    stripped = line.strip()
    if stripped in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      current = stripped
      continue
    if current is None:
      continue
    match = re.match(r'(\d+)\s+(.*)$', stripped)
    if not match:
      if stripped:
        current = None
      continue
    tables[current][int(match.group(1))] = match.group(2)
  files = {k: v.strip('"') for k, v in tables['FileNames'].items()}
  functions = {k: v.strip('"') for k, v in tables['FunctionNames'].items()}
  locations = {}
  for k, v in tables['FileLocations'].items():
    f, fn = re.search(r'file_name_id=(\d+)', v), re.search(r'function_name_id=(\d+)', v)
    line = re.search(r'\bline=(\d+)', v)
    locations[k] = (files.get(int(f.group(1)), '') if f else '', functions.get(int(fn.group(1)), '') if fn else '',
                    int(line.group(1)) if line else 0)
  frames = {}
  for k, v in tables['StackFrames'].items():
    loc = re.search(r'file_location_id=(\d+)', v)
    frames[k] = locations.get(int(loc.group(1)), ('', '', 0)) if loc else ('', '', 0)
  return frames


def parse_hlo(text: str) -> HloModule:
  """The computations, instructions and source frames of an HLO module's text."""
  lines = text.splitlines()
  header = re.match(r'HloModule\s+([\w.\-]+)', lines[0]) if lines else None
  frames = _frame_table(lines)
  computations, entry, current = {}, '', None
  for line in lines:
    match = _COMPUTATION.match(line.strip())
    if match:
      current = match.group(2)
      computations[current] = []
      if match.group(1):
        entry = current
      continue
    if line.strip() == '}':
      current = None
      continue
    if current is not None:
      inst = parse_instruction(line)
      if inst is not None:
        frame = _FRAME_ID.search(inst.attrs)
        if frame:
          *inst.source, inst.line = frames.get(int(frame.group(1)), ('', '', 0))
          inst.source = tuple(inst.source)
        computations[current].append(inst)
  if not entry:
    raise ValueError('No ENTRY computation in the HLO text: pass compiled.as_text() of a compiled program.')
  return HloModule(header.group(1) if header else '', entry, computations, frames)


# ---------------------------------------------------------------------------------------
# Costs


def array_shapes(shape: str) -> list[tuple[str, tuple[int, ...]]]:
  """[(dtype, dims)] of every array in a shape text (one, or several in a tuple)."""
  return [(d, tuple(int(x) for x in dims.split(',') if x)) for d, dims in _ARRAY.findall(shape)]


def elements(shape: str) -> int:
  return sum(math.prod(dims) for _, dims in array_shapes(shape))


def nbytes(shape: str) -> float:
  return sum(math.prod(dims) * _DTYPE_BYTES.get(d, 0.5 if d.startswith('f4') else 1)
             for d, dims in array_shapes(shape))


def _dims_attr(attrs: str, key: str) -> list[int]:
  match = re.search(key + r'=\{([\d,]*)\}', attrs)
  return [int(x) for x in match.group(1).split(',') if x] if match else []


def instruction_flops(inst: Instruction, shapes: dict) -> float:
  """FLOPs of one (non-fusion) instruction, 2 per multiply-add as XLA counts them:
  dot 2 * |out| * |contracted|; convolution 2 * |out| * |kernel| / |kernel output features|;
  a cuBLAS GEMM custom call like a dot (dimensions from its backend config); reduce |input|;
  other arithmetic |out|; data movement, bookkeeping, select, compare and convert 0."""
  op = inst.opcode
  out = elements(inst.shape)
  if op == 'dot':
    lhs = array_shapes(shapes.get(inst.operands[0], ''))
    contracted = [lhs[0][1][i] for i in _dims_attr(inst.attrs, 'lhs_contracting_dims')] if lhs else []
    return 2.0 * out * math.prod(contracted)
  if op == 'convolution':
    kernel = array_shapes(shapes.get(inst.operands[1], ''))
    labels = re.search(r'dim_labels=\w+_(\w+)->', inst.attrs)
    if not kernel or not labels:
      return 0.0
    dims = kernel[0][1]
    o = labels.group(1).find('o')
    return 2.0 * out * math.prod(dims) / max(dims[o], 1)
  if op == 'custom-call' and is_gemm_call(inst):
    lhs = array_shapes(shapes.get(inst.operands[0], '')) if inst.operands else []
    match = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst.attrs)
    if not lhs or not match:
      return 0.0
    contracted = [lhs[0][1][int(x.strip('" '))] for x in match.group(1).split(',') if x.strip('" ')]
    result = array_shapes(inst.shape)
    return 2.0 * math.prod(result[0][1]) * math.prod(contracted) if result else 0.0
  if op in ('reduce', 'reduce-window'):
    return float(sum(elements(shapes.get(o, '')) for o in inst.operands[:len(inst.operands) // 2 or 1]))
  if op in ZERO_FLOP or op.startswith(COLLECTIVE_PREFIXES) and not op.startswith(('all-reduce', 'reduce-scatter')):
    return 0.0
  return float(out)


def _custom_target(inst: Instruction) -> str:
  target = re.search(r'custom_call_target="([^"]*)"', inst.attrs)
  return target.group(1) if target else ''


def is_gemm_call(inst: Instruction) -> bool:
  """A custom call to a GEMM library (XLA:GPU's cuBLAS / cuBLASLt calls: '__cublas$gemm',
  '__cublas$lt$matmul')."""
  return any(k in _custom_target(inst).lower() for k in ('gemm', 'matmul', 'cublas'))


# ---------------------------------------------------------------------------------------
# Classes

_ATTENTION_FILES = ('fmjax/models/attention.py', 'fmjax/models/flash_jvp.py')


def source_class(inst: Instruction) -> str | None:
  """'attention' / 'norm/modulation' from where the instruction was traced, else None."""
  file, function = inst.source
  if file.endswith(_ATTENTION_FILES) or 'attention' in inst.op_name.lower():
    return 'attention'
  if file.endswith('nnx/nn/normalization.py') or function.split('.')[-1] == 'modulate':
    return 'norm/modulation'
  if re.search(r'(^|/)(layer_?norm|rms_?norm|modulate)\b', inst.op_name.lower()):
    return 'norm/modulation'
  return None


def _leaf_class(inst: Instruction) -> str:
  """The class of one instruction by its opcode and source (a fusion's member, or unfused)."""
  op = inst.opcode
  if op.startswith(COLLECTIVE_PREFIXES):
    return 'collective'
  by_source = source_class(inst)
  if op == 'custom-call':
    target = _custom_target(inst).lower()
    if 'fmha' in target or 'attention' in target or 'flash' in inst.attrs.lower():
      return 'attention'
    if is_gemm_call(inst):
      return by_source if by_source == 'attention' else 'matmul/conv'
    return by_source or 'other'
  if op in MATMUL:
    return 'attention' if by_source == 'attention' else 'matmul/conv'
  if op in LAYOUT:
    return 'layout/copy'
  if op in CONTROL or op in OTHER:
    return 'other'
  return by_source or 'elementwise'


def classify(inst: Instruction, module: HloModule) -> str:
  """The class of an executed instruction; a fusion by its members (module docstring)."""
  if inst.opcode != 'fusion':
    return _leaf_class(inst)
  members = [m for c in inst.calls for m in _members(module, c) if m.opcode not in BOOKKEEPING]
  if not members:
    return 'layout/copy'
  classes = [_leaf_class(m) for m in members]
  for cls in ('collective',):
    if cls in classes:
      return cls
  if any(m.opcode in MATMUL or (m.opcode == 'custom-call' and is_gemm_call(m)) for m in members):
    return 'attention' if 'attention' in classes else 'matmul/conv'
  if 'attention' in classes:
    return 'attention'
  if 'norm/modulation' in classes:
    return 'norm/modulation'
  if all(c == 'layout/copy' for c in classes):
    return 'layout/copy'
  known = any(m.source != ('', '') or m.op_name for m in members)
  opcodes = {m.opcode for m in members}
  if not known and 'exponential' in opcodes and 'reduce' in opcodes:
    return 'attention'        # softmax, when the program carries no source information
  if not known and 'rsqrt' in opcodes:
    return 'norm/modulation'
  if all(c in ('other', 'layout/copy') for c in classes) and 'other' in classes:
    return 'other'
  return 'elementwise'


def _members(module: HloModule, computation: str) -> list[Instruction]:
  """A fused computation's instructions, nested fusions flattened."""
  out = []
  for inst in module.computations.get(computation, []):
    if inst.opcode == 'fusion':
      out += [m for c in inst.calls for m in _members(module, c)]
    else:
      out.append(inst)
  return out


@dataclasses.dataclass
class OpCost:
  """One executed instruction: class, FLOPs and bytes per execution, executions per step."""
  name: str
  opcode: str
  cls: str
  flops: float
  bytes: float
  count: float = 1.0
  parent: str = ''          # the control-flow instruction whose body runs it ('' at top level)
  site: str = ''            # where it was traced: 'file.py:LINE function' (see `site`)


def site(inst: Instruction, module: HloModule) -> str:
  """'file.py:LINE function' of the Python line an executed instruction was traced from: its own
  frame (a fusion's is its root's), else the most frequent frame among a fusion's members; '' if
  the program carries no source information. It tells apart what one class lumps together
  (a GELU from a residual add, the loss from the optimizer update)."""
  source, line = inst.source, inst.line
  if source == ('', '') and inst.opcode == 'fusion':
    counts = collections.Counter((m.source, m.line) for c in inst.calls for m in _members(module, c)
                                 if m.source != ('', ''))
    if counts:
      (source, line), _ = counts.most_common(1)[0]
  return f"{os.path.basename(source[0])}:{line} {source[1].replace('.<locals>', '')}" if source != ('', '') else ''


def executed_ops(module: HloModule) -> dict[str, OpCost]:
  """Every instruction that runs as its own kernel / thunk (the entry's, and those of the
  bodies of while / conditional / call, a while body counted `known_trip_count` times),
  with its cost. Bookkeeping instructions (parameters, tuples, bitcasts) are left out."""
  ops = {}

  def visit(computation: str, count: float, parent: str):
    shapes = module.shapes(computation)
    for inst in module.computations.get(computation, []):
      if inst.opcode in BOOKKEEPING:
        continue
      if inst.opcode == 'fusion':
        members = [m for c in inst.calls for m in _members(module, c)]
        flops = sum(instruction_flops(m, _shapes_of(module, inst.calls)) for m in members)
      else:
        flops = instruction_flops(inst, shapes)
      moved = 0.0 if inst.opcode in CONTROL else (
          nbytes(inst.shape) + sum(nbytes(shapes.get(o, '')) for o in inst.operands))
      ops[inst.name] = OpCost(inst.name, inst.opcode, classify(inst, module), flops, moved, count, parent,
                              site(inst, module))
      if inst.opcode in CONTROL:
        trips = _TRIP_COUNT.search(inst.attrs)
        inner = count * (int(trips.group(1)) if trips and inst.opcode == 'while' else 1)
        for c in inst.calls:
          visit(c, inner, inst.name)

  visit(module.entry, 1.0, '')
  return ops


def _shapes_of(module: HloModule, computations) -> dict:
  shapes = {}
  stack = list(computations)
  while stack:
    c = stack.pop()
    for inst in module.computations.get(c, []):
      shapes[inst.name] = inst.shape
      if inst.opcode == 'fusion':
        stack += inst.calls
  return shapes


# ---------------------------------------------------------------------------------------
# Time per instruction


def trace_op_times(trace_dir: str, module_name: str = '') -> dict[str, float]:
  """Seconds per HLO instruction name summed over a `jax.profiler.trace` directory's XLA
  events (those with an `hlo_op` stat, of `module_name` when given). Device planes win over
  host planes when both have such events (on GPU the host's are launches, not kernels)."""
  import jax
  files = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)
  device, host = collections.Counter(), collections.Counter()
  for path in files:
    data = jax.profiler.ProfileData.from_file(path)
    for plane in data.planes:
      target = device if plane.name.startswith('/device:') else host
      lines = list(plane.lines)
      # A plane with a derived 'XLA Ops' line repeats its streams' kernels there: count once.
      derived = [line for line in lines if line.name == 'XLA Ops']
      for line in derived or lines:
        for event in line.events:
          stats = dict(event.stats)
          op = stats.get('hlo_op')
          if not op or (module_name and stats.get('hlo_module', module_name) != module_name):
            continue
          target[op] += event.duration_ns * 1e-9
  return dict(device or host)


def exclusive_times(times: dict, ops: dict[str, OpCost]) -> dict:
  """Per-instruction times with each control-flow instruction's body time taken out of its
  own (a while thunk's event spans its body's events)."""
  out = dict(times)
  for name, op in ops.items():
    if op.parent and op.parent in out and name in times:
      out[op.parent] = out[op.parent] - times[name]
  return {k: max(v, 0.0) for k, v in out.items()}


# Nominal peaks for the cost-model fallback: (FLOP/s, bytes/s). H100 SXM: 989 TFLOP/s dense bf16,
# 3.35 TB/s HBM3 (NVIDIA datasheet); the CPU entry is a placeholder that only sets proportions.
NOMINAL_PEAKS = (('H100', (989.4e12, 3.35e12)), ('H200', (989.4e12, 4.8e12)),
                 ('A100', (312e12, 2.0e12)), ('cpu', (1e11, 2e10)))


def roofline_times(ops: dict[str, OpCost], device_kind: str) -> dict[str, float]:
  """Per-instruction time estimates max(FLOPs / peak, bytes / bandwidth) x executions."""
  peak, bandwidth = next((p for k, p in NOMINAL_PEAKS if k.lower() in device_kind.lower()),
                         NOMINAL_PEAKS[-1][1])
  return {n: op.count * max(op.flops / peak, op.bytes / bandwidth) for n, op in ops.items()}


# ---------------------------------------------------------------------------------------
# The table


def class_table(ops: dict[str, OpCost], times: dict[str, float]) -> dict:
  """{class: {time_s, time_share, flops, flops_share, bytes, bytes_share, intensity, ops}} per
  step, every class of CLASSES present (zeros where none ran); shares sum to 1."""
  rows = {c: {'time_s': 0.0, 'flops': 0.0, 'bytes': 0.0, 'ops': 0} for c in CLASSES}
  for name, op in ops.items():
    row = rows[op.cls]
    row['time_s'] += times.get(name, 0.0)
    row['flops'] += op.flops * op.count
    row['bytes'] += op.bytes * op.count
    row['ops'] += 1
  totals = {k: sum(r[k] for r in rows.values()) for k in ('time_s', 'flops', 'bytes')}
  for row in rows.values():
    row['time_share'] = row['time_s'] / totals['time_s'] if totals['time_s'] else 0.0
    row['flops_share'] = row['flops'] / totals['flops'] if totals['flops'] else 0.0
    row['bytes_share'] = row['bytes'] / totals['bytes'] if totals['bytes'] else 0.0
    row['intensity'] = row['flops'] / row['bytes'] if row['bytes'] else 0.0
  return rows


def site_table(ops: dict[str, OpCost], times: dict[str, float], top: int = 20) -> list[dict]:
  """The `top` source lines (`site`) by time per step: [{site, class, time_s, time_share, flops,
  bytes, ops}], class the one that took most of the line's time; instructions without source
  information are one row, site ''."""
  rows = {}
  total = sum(times.get(name, 0.0) for name in ops) or 1.0
  for name, op in ops.items():
    row = rows.setdefault(op.site, {'site': op.site, 'time_s': 0.0, 'flops': 0.0, 'bytes': 0.0, 'ops': 0,
                                    'by_class': collections.Counter()})
    row['time_s'] += times.get(name, 0.0)
    row['flops'] += op.flops * op.count
    row['bytes'] += op.bytes * op.count
    row['ops'] += 1
    row['by_class'][op.cls] += times.get(name, 0.0)
  out = []
  for row in sorted(rows.values(), key=lambda r: -r['time_s'])[:top]:
    by_class = row.pop('by_class')
    row['class'] = max(by_class, key=by_class.get)
    row['time_share'] = row['time_s'] / total
    out.append(row)
  return out


def format_sites(rows: list[dict]) -> str:
  from fmjax import benchmarking
  columns = ('source line', 'class', 'time %', 'time ms', 'GFLOP', 'GB', 'ops')
  cells = [[r['site'] or '(no source)', r['class'], f"{100 * r['time_share']:.1f}", f"{1e3 * r['time_s']:.3f}",
            f"{r['flops'] / 1e9:.4g}", f"{r['bytes'] / 1e9:.4g}", r['ops']] for r in rows]
  return benchmarking.markdown_table(columns, cells)


def format_table(rows: dict) -> str:
  from fmjax import benchmarking
  columns = ('class', 'time %', 'time ms', 'FLOP %', 'GFLOP', 'bytes %', 'MB', 'FLOP/byte', 'ops')
  cells = [[c, f"{100 * r['time_share']:.1f}", f"{1e3 * r['time_s']:.3f}", f"{100 * r['flops_share']:.1f}",
            f"{r['flops'] / 1e9:.4g}", f"{100 * r['bytes_share']:.1f}", f"{r['bytes'] / 1e6:.4g}",
            f"{r['intensity']:.2f}", r['ops']] for c, r in rows.items()]
  total = [sum(r[k] for r in rows.values()) for k in ('time_s', 'flops', 'bytes', 'ops')]
  cells.append(['total', '100.0', f'{1e3 * total[0]:.3f}', '100.0', f'{total[1] / 1e9:.4g}', '100.0',
                f'{total[2] / 1e6:.4g}', f'{total[1] / total[2]:.2f}' if total[2] else '', total[3]])
  return benchmarking.markdown_table(columns, cells)


def profile_compiled(compiled, run, *, steps: int = 3, time_source: str = 'profiler',
                     trace_dir: str | None = None) -> dict:
  """The per-class table of a compiled program, `run()` executing it once (and waiting).

  time_source 'profiler': times from a `jax.profiler.trace` of `steps` calls of `run`
  (falls back to the cost model when the trace has no XLA events); 'cost_model': the
  roofline estimate of `roofline_times`. Returns {'classes', 'source', 'step_s', ...}.
  """
  import jax
  if time_source not in ('profiler', 'cost_model'):
    raise ValueError(f"time_source must be 'profiler' or 'cost_model', got {time_source!r}.")
  if steps < 1:
    raise ValueError(f'steps must be >= 1, got {steps}.')
  module = parse_hlo(compiled.as_text())
  ops = executed_ops(module)
  walls = []
  for _ in range(steps):   # wall time per step, outside the profiler
    start = time.perf_counter()
    run()
    walls.append(time.perf_counter() - start)
  source, times, raw = 'cost_model', {}, {}
  if time_source == 'profiler':
    with tempfile.TemporaryDirectory(dir=trace_dir) as directory:
      with jax.profiler.trace(directory):
        for _ in range(steps):
          run()
      raw = trace_op_times(directory, module.name)
    # per step and per device: the devices' events all name the same (SPMD) program's instructions
    per_call = steps * jax.device_count()
    matched = {k: v / per_call for k, v in raw.items() if k in ops}
    if matched:
      source, times = 'profiler', exclusive_times(matched, ops)
  if source == 'cost_model':
    times = roofline_times(ops, jax.devices()[0].device_kind)
  from fmjax import benchmarking
  xla = benchmarking.xla_cost(compiled)
  return {'classes': class_table(ops, times), 'source': source, 'step_s': statistics.median(walls),
          'xla_flops': xla['flops'], 'xla_bytes': xla['bytes_accessed'], 'module': module.name,
          # trace events naming no executed instruction of the program (expected: none)
          'unmatched_ops': sorted(set(raw) - set(ops))[:20],
          'sites': site_table(ops, times),
          'top_ops': sorted(({'name': n, 'class': ops[n].cls, 'opcode': ops[n].opcode, 'time_s': t,
                              'site': ops[n].site, 'flops': ops[n].flops * ops[n].count,
                              'bytes': ops[n].bytes * ops[n].count}
                             for n, t in times.items() if n in ops), key=lambda r: -r['time_s'])[:40]}


def describe_source(result: dict) -> str:
  if result['source'] == 'profiler':
    return ('time: jax.profiler trace, XLA events per HLO instruction (summed over threads, '
            'mean per step and device)')
  return ('time: ESTIMATE from a roofline cost model, max(FLOPs / peak, bytes / bandwidth) per '
          'instruction (no profiler events were matched)')


# ---------------------------------------------------------------------------------------
# The command line


SIZES = ('tiny', 'B', 'M', 'L', 'XL')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default='dit', choices=('dit',))
  parser.add_argument('--size', default='tiny', choices=SIZES,
                      help='DiT size of experiments/imagenet256_dit.py (tiny: CPU-size network, 8x8 inputs)')
  parser.add_argument('--rule', default='flow_matching',
                      help='flow_matching | lsd | meanflow | meanflow+cfg | imf | sct')
  parser.add_argument('--batch', type=int, default=0, help="global batch (0: the experiment's, 8 for tiny)")
  parser.add_argument('--dtype', default='', help="compute dtype (default: the experiment's)")
  parser.add_argument('--attention', default='', help="naive | blockwise | flash | auto (default: the experiment's)")
  parser.add_argument('--blocks', default='unrolled', choices=('unrolled', 'scanned'),
                      help="the DiT's blocks unrolled or scanned (config.model.scan_blocks)")
  parser.add_argument('--remat', default='', help="DiT block remat policy: none | dots | block (default: the experiment's)")
  parser.add_argument('--devices', type=int, default=0, help='fake CPU devices (XLA host platform device count)')
  parser.add_argument('--steps', type=int, default=3, help='profiled steps (after one untimed)')
  parser.add_argument('--time_source', default='profiler', choices=('profiler', 'cost_model'))
  parser.add_argument('--out', default='', help='JSON file for the table')
  args = parser.parse_args(argv)
  if args.devices:
    if 'jax' in sys.modules:
      parser.error('--devices must be set before jax is imported (run this file as a script).')
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={args.devices}').strip()
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import jax
  import train_throughput
  if args.rule not in train_throughput.RULES:
    parser.error(f'unknown rule {args.rule!r}; choose from {train_throughput.RULES}.')
  tiny = args.size == 'tiny'
  batch = args.batch or (8 if tiny else 0)
  row = train_throughput.Row('dit-b2', args.rule, attention=args.attention, remat=args.remat,
                             scan_blocks=args.blocks == 'scanned', tiny=tiny, batch=batch,
                             dtype=args.dtype, size='' if tiny else args.size,
                             workdir=tempfile.mkdtemp(prefix='fmjax_profile_'))
  row.lower()
  row.compile()
  setup = row.setup
  with jax.set_mesh(setup.mesh):
    carried = {'state': setup.init_state()}

    def run():
      carried['state'], _ = row.compiled(carried['state'], row.batch, row.stop)
      jax.block_until_ready(carried['state'])

    run()   # the first call: allocation and any lazy initialization, not profiled
    result = profile_compiled(row.compiled, run, steps=args.steps, time_source=args.time_source)
  device = jax.devices()[0]
  result.update(model=f'DiT-{args.size}', rule=args.rule, batch=row.row['batch'], dtype=row.row['dtype'],
                attention=row.row['attention'], remat=row.row['remat'], blocks=row.row['blocks'],
                devices=jax.device_count(), device_kind=device.device_kind,
                platform=device.platform, jax=jax.__version__, model_flops=row.row['model_flops'],
                compile_s=row.row['compile_s'])
  table = sum(r['flops'] for r in result['classes'].values())
  print(f"DiT-{args.size}, {args.rule}, batch {result['batch']}, {result['dtype']}, "
        f"{result['attention']} attention, on {jax.device_count()} x {device.device_kind} "
        f"({device.platform}), jax {jax.__version__}")
  print(f"step {1e3 * result['step_s']:.2f} ms (median wall); {describe_source(result)}")
  n = jax.device_count()
  print(f"FLOPs of one device's program: this table {table / 1e9:.4g} G, XLA cost analysis "
        f"{result['xla_flops'] / 1e9:.4g} G, analytic (fmjax.models.flops) / {n} devices "
        f"{result['model_flops'] / n / 1e9:.4g} G")
  print()
  print(format_table(result['classes']))
  print()
  print('slowest instructions: ' + ', '.join(f"{o['name']} ({o['class']}, {1e3 * o['time_s']:.3f} ms)"
                                             for o in result['top_ops'][:8]))
  print()
  print('Where in the code (the source line each instruction was traced from; a fusion by its root):')
  print()
  print(format_sites(result['sites']))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == '__main__':
  main()
