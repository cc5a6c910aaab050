"""Naive, blockwise, fused-jvp (Pallas) and cuDNN attention under forward, jvp, and grad of a loss on the jvp.

    python benchmarks/attention_jvp.py                       # CPU defaults
    python benchmarks/attention_jvp.py --seq 1024 4096 16384 --heads 16 --out attention.md
    python benchmarks/attention_jvp.py --seq 64 --impls naive,flash --interpret   # CPU smoke test

For each sequence length and implementation, reports XLA's own numbers for the compiled
program (temporary memory from `memory_analysis()`, FLOPs from `cost_analysis()`) beside
the measured wall time (median of --repeats runs after one warm-up). The three modes are
what the flow-map rules need: the forward pass, `jax.jvp` (d/dt of the network: the
Lagrangian/Eulerian tangents), and `jax.grad` of a loss on the forward output, on the jvp's
primal with its tangent stop-gradiented (MeanFlow, iMF, sCT, ESD), and on the jvp output
(LSD-type rules that backpropagate through the tangent). For that last mode, 'flash' is the fused
backward kernel (tangent_backward='kernel': fmjax.models.flash_jvp_backward on a GPU,
flash_jvp_backward_tpu on a TPU) and 'flash-bwd-blockwise' the same flash attention with the
pure-JAX blockwise backward, measured in that mode only. On a TPU the 'flash' columns run the
Mosaic kernels (kernel='auto'). Prints a markdown table and writes it to --out.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp

from fmjax import benchmarking
from fmjax.models import attention


def _modes(attend):
  def forward(q, k, v, dq, dk, dv):
    return attend(q, k, v)

  def jvp(q, k, v, dq, dk, dv):
    return jax.jvp(attend, (q, k, v), (dq, dk, dv))

  def grad_of_jvp(q, k, v, dq, dk, dv):
    def loss(q, k, v, dq, dk, dv):
      return jnp.sum(jax.jvp(attend, (q, k, v), (dq, dk, dv))[1].astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=tuple(range(6)))(q, k, v, dq, dk, dv)

  def grad_of_jvp_stopped(q, k, v, dq, dk, dv):
    # MeanFlow / iMF / sCT / ESD: the loss uses the primal and a stop-gradiented tangent.
    def loss(q, k, v):
      o, do = jax.jvp(attend, (q, k, v), (dq, dk, dv))
      return jnp.sum((o.astype(jnp.float32) - jax.lax.stop_gradient(do.astype(jnp.float32))) ** 2)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  def grad_of_forward(q, k, v, dq, dk, dv):
    return jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2),
                    argnums=(0, 1, 2))(q, k, v)

  return {'forward': forward, 'grad(forward)': grad_of_forward, 'jvp': jvp,
          'grad(jvp, sg tangent)': grad_of_jvp_stopped, 'grad(jvp)': grad_of_jvp}


def measure(fn, args, repeats: int, flops_fn=None):
  """(temp bytes, FLOPs, median seconds); NaN for a number the backend does not give. XLA's
  cost analysis counts a while-loop body once, so the FLOPs of a blocked program come from
  `flops_fn`, the same algorithm with one block (its loops run once), compiled but never run."""
  compiled, _ = benchmarking.compile(fn, *args)
  flops = benchmarking.xla_cost(benchmarking.compile(flops_fn, *args)[0] if flops_fn else compiled)['flops']
  timing = benchmarking.time_calls(lambda: compiled(*args), repeats=repeats, warmup=1)
  return benchmarking.temp_bytes(compiled), flops, timing.median_s


def _mib(x):
  return 'n/a' if math.isnan(x) else f'{x / 2**20:,.1f}'


# Matmul FLOPs per (batch, head) in units of N_q N_k D: forward 2 matmuls (q k^T, P v) = 4;
# the fused jvp kernel 6 matmuls (q k^T, dq k^T, q dk^T, w v, w dS v, w dv) = 12, run beside the
# primal kernel (4): jvp = 16. Used for the fused kernel's TFLOP/s, where XLA cannot count
# inside a custom call.
# grad(jvp) of a loss on dO alone: the jvp kernel (12) plus the fused backward's two kernels, 10
# matmuls per tile over key blocks and 8 over query blocks (18): 30.
ANALYTIC_UNITS = {'forward': 4, 'jvp': 16, 'forward+jvp': 16, 'grad(jvp)': 30}
# Implementations measured in some modes only (the others would repeat another column).
ONLY_MODES = {'flash-bwd-blockwise': ('grad(jvp)',)}


def _safe_measure(fn, args, repeats, flops_fn=None):
  try:
    return measure(fn, args, repeats, flops_fn)
  except Exception as e:   # noqa: BLE001 -- a size that does not fit is a result ('OOM'), not a crash
    message = str(e).split('\n')[0][:80]
    print(f'  failed: {message}', flush=True)
    return 'OOM' if 'RESOURCE_EXHAUSTED' in str(e) or 'out of memory' in str(e).lower() else 'error'


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--seq', type=int, nargs='+', default=[256, 1024, 4096])
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--head-dim', type=int, default=64)
  parser.add_argument('--block-size', type=int, default=256)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--impls', default=None,
                      help='comma list of naive,blockwise,flash,flash-bwd-blockwise,cudnn (default: '
                           'naive,blockwise on CPU; all five on GPU; all but cudnn on TPU)')
  parser.add_argument('--interpret', action='store_true',
                      help="run the fused kernel in Pallas' interpreter (CPU smoke test)")
  parser.add_argument('--out', default='attention_jvp.md')
  args = parser.parse_args()

  backend = jax.default_backend()
  names = (args.impls.split(',') if args.impls else
           ['naive', 'blockwise', 'flash', 'flash-bwd-blockwise', 'cudnn'] if backend == 'gpu'
           else ['naive', 'blockwise', 'flash', 'flash-bwd-blockwise'] if backend == 'tpu'
           else ['naive', 'blockwise'])
  dtype = jnp.dtype(args.dtype)
  impls = {'naive': attention.naive_attention,
           'blockwise': attention.attention_fn('blockwise', block_size=args.block_size),
           'flash': attention.attention_fn('flash', interpret=args.interpret, tangent_backward='kernel'),
           # The pre-kernel backward, as measured before (flash_attention's default block_size).
           'flash-bwd-blockwise': attention.attention_fn('flash', interpret=args.interpret,
                                                         tangent_backward='blockwise'),
           # cuDNN's fused attention: forward and reverse mode only (custom_vjp: no jvp).
           'cudnn': lambda q, k, v: jax.nn.dot_product_attention(
               q, k, v, implementation='cudnn' if dtype != jnp.float32 else None)}
  impls = {k: impls[k] for k in names}
  header = (f'Attention under jvp on {jax.devices()[0].device_kind} ({jax.default_backend()}), '
            f'batch {args.batch}, {args.heads} heads x {args.head_dim}, {args.dtype}, '
            f'blockwise block {args.block_size}. Memory: XLA temp bytes of the compiled program; '
            f'time: median of {args.repeats} after a warm-up; naive GFLOP: XLA cost analysis; '
            f'flash TFLOP/s: analytic matmul FLOPs ({ANALYTIC_UNITS} x B H N^2 D) / time. '
            f'cuDNN has no forward mode, so its jvp rows are empty.')
  columns = (['seq', 'mode'] + [f'{n} {what}' for n in impls for what in ('temp MiB', 'ms')]
             + ['naive GFLOP', 'flash TFLOP/s', 'naive / flash'])
  align = ['right', ''] + ['right'] * (len(columns) - 2)
  rows = []
  print(header, flush=True)
  checks = []
  for n in args.seq:
    keys = jax.random.split(jax.random.key(n), 6)
    shape = (args.batch, n, args.heads, args.head_dim)
    inputs = [jax.random.normal(k, shape, dtype) for k in keys]
    results = {}
    if 'flash' in impls and 'naive' in impls:   # the kernel on this device against XLA's naive attention, same inputs
      try:
        jvp_of = lambda f: jax.jit(lambda *a: jax.jvp(f, a[:3], a[3:]))(*inputs)
        (o_f, do_f), (o_n, do_n) = jvp_of(impls['flash']), jvp_of(attention.naive_attention)
        err = [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
               for a, b in ((o_f, o_n), (do_f, do_n))]
        check = f'seq {n}: flash vs naive max |O diff| {err[0]:.2e}, max |dO diff| {err[1]:.2e}'
      except Exception as e:   # noqa: BLE001
        check = f'seq {n}: flash check failed: {str(e).splitlines()[0][:200]}'
      print(check, flush=True)
      checks.append(check)
    one_block = _modes(attention.attention_fn('blockwise', block_size=n))
    for name, attend in impls.items():
      for mode, fn in _modes(attend).items():
        if (name == 'cudnn' and 'jvp' in mode) or mode not in ONLY_MODES.get(name, (mode,)):
          continue
        results[name, mode] = _safe_measure(fn, inputs, args.repeats,
                                            one_block[mode] if name == 'blockwise' else None)
    for mode in ('forward', 'grad(forward)', 'jvp', 'grad(jvp, sg tangent)', 'grad(jvp)'):
      cells, times = [], {}
      for name in impls:
        r = results.get((name, mode))
        if r is None:
          cells += ['-', '-']
        elif isinstance(r, str):
          cells += [r, r]
        else:
          cells += [_mib(r[0]), f'{r[2] * 1e3:,.2f}']
          times[name] = r[2]
      naive = results.get(('naive', mode))
      gflop = f'{naive[1] / 1e9:,.2f}' if isinstance(naive, tuple) and naive[1] > 0 else 'n/a'   # NaN: none
      units = ANALYTIC_UNITS.get(mode)
      rate = (f'{units * args.batch * args.heads * n * n * args.head_dim / times["flash"] / 1e12:,.1f}'
              if units and 'flash' in times else 'n/a')
      ratio = f'{times["naive"] / times["flash"]:.2f}x' if 'naive' in times and 'flash' in times else 'n/a'
      rows.append([n, mode] + cells + [gflop, rate, ratio])
      print(benchmarking.markdown_row(rows[-1]), flush=True)
    # After every length: a run cut short keeps what it measured.
    benchmarking.write(args.out, report(header, columns, rows, align, checks))
  benchmarking.write(args.out, report(header, columns, rows, align, checks))
  print(f'wrote {args.out}')


def report(header: str, columns, rows, align, checks) -> str:
  table = benchmarking.markdown_table(columns, rows, align)
  return '\n'.join([header, '', table, ''] + [f'- {c}' for c in checks]) + '\n'


if __name__ == '__main__':
  main()
