"""The measuring layer every script in benchmarks/ shares: compile time, XLA's cost and memory
numbers, call timing, and the markdown table the scripts print and write.

What each number is:
  compile        seconds of jit + lower + compile (XLA's own work; the first call's extra time)
  xla_cost       XLA's count for the program: FLOPs (2 per multiply-add: an [M, K] x [K, N]
                 matmul is 2 M N K on XLA:CPU) and bytes read and written. XLA counts a loop
                 body once, however often it runs; XLA:GPU leaves out the GEMMs it hands to
                 cuBLAS in the optimized program (the lowered, unoptimized one keeps them).
                 Analytic counts live in fmjax.models.flops.
  temp_bytes     XLA's temporary buffer size of the compiled program (beyond arguments and
                 outputs): the activation memory a step needs
  saved_residual_bytes
                 bytes of the values reverse mode keeps from the forward pass for the backward
                 (arguments excluded), from the jaxpr: what jax.checkpoint policies control,
                 the same on every backend, before the compiler schedules anything
  time_calls     wall seconds per call (median) and the process's CPU seconds per call
  interleaved    the same for several functions called in turn, so that a drift in the
                 machine's load hits each alike and their ratios come from one run

jax is imported where a function needs it, not at import: fid_cpu_speed.py times a TorchScript
network with `time_calls` in an environment without jax.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

NAN = float('nan')


def compile(fn: Callable, *args, compiler_options: dict | None = None):
  """(compiled, seconds): `fn` jitted (as is when already jitted, so its donation and shardings
  stay), lowered for `args` and compiled, timed together."""
  import jax
  jitted = fn if hasattr(fn, 'lower') else jax.jit(fn)
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile(compiler_options)
  return compiled, time.perf_counter() - start


def _cost_dict(analysis) -> dict:
  """One dict of a `cost_analysis()` result in any of its forms across jax versions: a dict, a
  list of one dict per program (older jax: the first is the program), or None / [] (none)."""
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return dict(analysis or {})


def xla_cost(compiled_or_lowered) -> dict:
  """{'flops', 'bytes_accessed'} of a compiled or lowered program, NaN for a number the backend
  does not give (or a backend that gives no cost analysis at all)."""
  try:
    cost = _cost_dict(compiled_or_lowered.cost_analysis())
  except Exception:   # noqa: BLE001 -- a backend without a cost model: no numbers, not a crash
    cost = {}
  return {'flops': float(cost.get('flops', NAN)), 'bytes_accessed': float(cost.get('bytes accessed', NAN))}


def temp_bytes(compiled) -> float:
  """XLA's temporary buffer size of a compiled program in bytes; NaN where the backend reports
  no memory analysis."""
  try:
    return float(compiled.memory_analysis().temp_size_in_bytes)
  except Exception:   # noqa: BLE001 -- None (no analysis), a missing field or an unsupported backend
    return NAN


def saved_residual_bytes(f: Callable, primals, *inputs) -> int:
  """Bytes of the residuals `jax.vjp(lambda p: f(p, *inputs), primals)` keeps for the backward
  pass: every value reverse mode saves from the forward, except `primals` and `inputs` themselves.

  Read from the traced jaxpr: `primals` and `inputs` may be ShapeDtypeStructs, nothing runs or
  compiles. `inputs` (a batch, a key) enter undifferentiated. Each residual counts once however
  often the backward reads it.
  """
  import jax   # pylint: disable=import-outside-toplevel
  from jax.extend import core as jax_core   # pylint: disable=import-outside-toplevel
  import numpy as np   # pylint: disable=import-outside-toplevel

  def residuals(p, *xs):
    return jax.tree.leaves(jax.vjp(lambda q: f(q, *xs), p)[1])

  closed = jax.make_jaxpr(residuals)(primals, *inputs)
  arguments = set(closed.jaxpr.invars)
  total, seen = 0, set()
  for var in closed.jaxpr.outvars:
    if isinstance(var, jax_core.Literal) or var in arguments or var in seen:
      continue   # a constant, an argument, or a residual counted already
    seen.add(var)
    total += np.dtype(var.aval.dtype).itemsize * int(np.prod(var.aval.shape))
  return int(total)


class Timing(NamedTuple):
  """Seconds of the timed calls (warm-up calls excluded).

  median_s        median wall seconds per call
  times           wall seconds of each call
  cpu_s_per_call  process CPU seconds (all threads) per call, the mean over the calls
  cpu_times       process CPU seconds of each call

  The CPU seconds are the robust number on a shared machine: other processes stretch the wall
  time but not the work this process does (spin-waiting threads do count). On an accelerator
  they are host time only.
  """
  median_s: float
  times: list
  cpu_s_per_call: float
  cpu_times: list


def _block(out):
  """Waits for `out`'s arrays. A process that never imported jax made no jax arrays (e.g. the
  TorchScript run of fid_cpu_speed.py, whose CPU calls return finished tensors)."""
  jax = sys.modules.get('jax')
  return out if jax is None else jax.block_until_ready(out)


def _timed_call(fn, clock, cpu_clock) -> tuple[float, float]:
  start, start_cpu = clock(), cpu_clock()
  _block(fn())
  return clock() - start, cpu_clock() - start_cpu


def _timing(times: list, cpu_times: list) -> Timing:
  return Timing(statistics.median(times), times, sum(cpu_times) / len(cpu_times), cpu_times)


def time_calls(fn: Callable[[], Any], *, repeats: int, warmup: int = 1,
               clock: Callable[[], float] = time.perf_counter,
               cpu_clock: Callable[[], float] = time.process_time) -> Timing:
  """Calls `fn()` `warmup` times untimed, then `repeats` times timed; every call's output is
  waited for (jax.block_until_ready) before the clock stops, so asynchronous dispatch does not
  hide the work. `clock` / `cpu_clock` are the wall and CPU clocks (injectable for tests)."""
  if repeats < 1 or warmup < 0:
    raise ValueError(f'time_calls needs repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.')
  for _ in range(warmup):
    _block(fn())
  times, cpu_times = zip(*(_timed_call(fn, clock, cpu_clock) for _ in range(repeats)))
  return _timing(list(times), list(cpu_times))


def interleaved(fns: dict, *, repeats: int, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter,
                cpu_clock: Callable[[], float] = time.process_time) -> dict:
  """{name: Timing}: `warmup` untimed rounds, then `repeats` rounds that call every function of
  `fns` once, in order, each waited for as in `time_calls`. Interleaving makes the ratios
  between the functions robust to the machine's load drifting during the run."""
  if repeats < 1 or warmup < 0:
    raise ValueError(f'interleaved needs repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.')
  for _ in range(warmup):
    for fn in fns.values():
      _block(fn())
  measured = {name: ([], []) for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      wall, cpu = _timed_call(fn, clock, cpu_clock)
      measured[name][0].append(wall)
      measured[name][1].append(cpu)
  return {name: _timing(times, cpu_times) for name, (times, cpu_times) in measured.items()}


def markdown_row(cells: Sequence) -> str:
  """One table row, '| a | b |'; cells are written with str() (the caller formats numbers)."""
  return '| ' + ' | '.join(str(c) for c in cells) + ' |'


_ALIGN = {'': '---', 'left': ':---', 'right': '---:', 'center': ':---:'}


def markdown_table(header: Sequence, rows: Sequence[Sequence], align: Sequence[str] | None = None) -> str:
  """A markdown table (no trailing newline): the header row, the separator row, then `rows`.
  `align` gives each column '', 'left', 'right' or 'center' (default: all '')."""
  align = [''] * len(header) if align is None else list(align)
  if len(align) != len(header) or set(align) - set(_ALIGN):
    raise ValueError(f"align needs one of {sorted(_ALIGN)} per column ({len(header)}), got {align}.")
  for row in rows:
    if len(row) != len(header):
      raise ValueError(f'a table row has {len(row)} cells for {len(header)} columns: {list(row)}; '
                       f'header {list(header)}.')
  separator = '|' + '|'.join(_ALIGN[a] for a in align) + '|'
  return '\n'.join([markdown_row(header), separator] + [markdown_row(row) for row in rows])


def write(path: str, text: str) -> None:
  """Writes `text` to `path`, creating its folder."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  with open(path, 'w') as f:
    f.write(text)
