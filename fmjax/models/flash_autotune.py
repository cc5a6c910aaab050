"""Block sizes for the fused jvp attention kernel, found by timing and kept in a JSON cache.

`fmjax.models.flash_jvp.attention_and_tangent` takes (block_q, block_k, num_warps,
num_stages); the fastest choice depends on the device and the shape. This module:

  candidates(shape, dtype, device_kind)  the settings worth trying: blocks are powers of two
      from 16 (Triton's smallest dot tile) up to the padded sequence length (the kernel clamps
      larger blocks to it, so they would repeat a smaller candidate), and the shared-memory
      estimate `shared_memory_bytes` is under the device kind's limit (`SHARED_MEMORY_LIMITS`)
  time_candidate(...)   compile once, warm up, the median of `repeats` timed calls, each
      waited for with jax.block_until_ready; a candidate that fails to compile (e.g. Triton
      runs out of shared memory after all) times as infinity instead of stopping the search
  search(...)           the fastest candidate and every timing (a timer can be injected)
  tuned_blocks(shape, dtype, kernel='jvp')  the cached choice for this device, or None; it only
      reads the cache (never times anything), so it is safe to call while jax traces
  python -m fmjax.models.flash_autotune --seq 4096 --heads 12 --head_dim 64 --batch 8 \\
      --dtype bfloat16      search on the current device and write the cache

The cache is `$FMJAX_CACHE/flash_autotune.json` (or ~/.cache/fmjax/flash_autotune.json), one
entry per (device kind, batch, seq_q, seq_k, heads, head_dim, dtype, kernel); it is written
atomically (a temporary file renamed over it), and a cache file that cannot be read gives one
warning and is treated as empty. Off GPU the CLI refuses unless --interpret is given: times of
Pallas' interpreter say nothing about a GPU (they are for testing this module).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable, Iterable, NamedTuple

KERNELS = ('jvp',)
BLOCKS = (16, 32, 64, 128, 256)
NUM_WARPS = (4, 8)
NUM_STAGES = (1, 2, 3, 4)

# Shared memory one thread block may use, bytes, by `jax.Device.device_kind` substring (first
# match wins). NVIDIA CUDA C Programming Guide, "Compute Capabilities" table: 227 KiB per block
# on compute capability 9.0 (H100, H200; 228 KiB per SM), 163 KiB on 8.0 (A100; 164 KiB per
# SM), 99 KiB on 8.6 / 8.9 (A10, L4, RTX 30xx / 40xx), 96 KiB on 7.0 (V100).
SHARED_MEMORY_LIMITS = (
    ('H100', 227 * 1024),
    ('H200', 227 * 1024),
    ('GH200', 227 * 1024),
    ('A100', 163 * 1024),
    ('A800', 163 * 1024),
    ('L4', 99 * 1024),
    ('L40', 99 * 1024),
    ('A10', 99 * 1024),
    ('RTX', 99 * 1024),
    ('V100', 96 * 1024),
)
DEFAULT_GPU_SHARED_MEMORY = 96 * 1024   # an unknown GPU: the smallest limit above


class Shape(NamedTuple):
  """An attention call's shape: q is [batch, seq_q, heads, head_dim], k and v [batch, seq_k, ...]."""
  batch: int
  seq_q: int
  seq_k: int
  heads: int
  head_dim: int


class Candidate(NamedTuple):
  block_q: int
  block_k: int
  num_warps: int
  num_stages: int

  def as_dict(self) -> dict:
    return self._asdict()


def _next_power_of_2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def padded_head_dim(head_dim: int) -> int:
  """The head dimension the kernel works in (flash_jvp pads it to a power of two, at least 16)."""
  return max(16, _next_power_of_2(head_dim))


def _itemsize(dtype) -> int:
  import numpy as np
  try:
    return np.dtype(dtype).itemsize
  except TypeError:
    import jax.numpy as jnp
    return jnp.dtype(dtype).itemsize


def shared_memory_bytes(candidate: Candidate, head_dim: int, dtype) -> int:
  """An estimate of the kernel's shared memory per program (one query block of one head).

  Each step of the key loop loads four [block_k, D] tiles (k, v, dk, dv); Triton's software
  pipeline keeps `num_stages` of them in flight (num_stages 1: one). The [block_q, D] tiles of
  q and dq stay resident, and the two [block_q, block_k] weight tiles fed to matmuls (w and
  w dS, cast to the input dtype) are staged through shared memory for the MMA's layout:

    bytes = itemsize * (max(num_stages, 1) * 4 * block_k * D + 2 * block_q * D
                        + 2 * block_q * block_k),   D = the padded head dim.

  The float32 accumulators (m, l, two [block_q, D] sums, c) live in registers. An estimate:
  Triton may reuse buffers (less) or add layout-conversion scratch (more); a candidate that
  still does not fit fails to compile, and `time_candidate` scores it as infinity.
  """
  d = padded_head_dim(head_dim)
  size = _itemsize(dtype)
  bq, bk = candidate.block_q, candidate.block_k
  return size * (max(candidate.num_stages, 1) * 4 * bk * d + 2 * bq * d + 2 * bq * bk)


def shared_memory_limit(device_kind: str) -> float:
  """Bytes of shared memory per thread block for a device kind; infinite off GPU (interpret
  mode has no such limit), DEFAULT_GPU_SHARED_MEMORY for an unknown GPU."""
  kind = device_kind.lower()
  for key, limit in SHARED_MEMORY_LIMITS:
    if key.lower() in kind:
      return limit
  if kind == 'cpu' or 'tpu' in kind:
    return math.inf
  return DEFAULT_GPU_SHARED_MEMORY


def _check_shape(shape) -> Shape:
  shape = Shape(*(int(x) for x in shape))
  if min(shape) < 1:
    raise ValueError(f'flash_autotune: every size of {shape} must be positive.')
  return shape


def candidates(shape, dtype, device_kind: str, *, blocks: Iterable[int] = BLOCKS,
               num_warps: Iterable[int] = NUM_WARPS, num_stages: Iterable[int] = NUM_STAGES,
               shared_memory: float | None = None) -> list[Candidate]:
  """The (block_q, block_k, num_warps, num_stages) worth timing for `shape` (module docstring).

  `shared_memory` overrides the device kind's limit (bytes)."""
  shape = _check_shape(shape)
  bad = [b for b in blocks if b < 16 or b & (b - 1)]
  if bad:
    raise ValueError(f'flash_autotune: blocks must be powers of two >= 16, got {bad}.')
  limit = shared_memory_limit(device_kind) if shared_memory is None else shared_memory
  max_q, max_k = max(16, _next_power_of_2(shape.seq_q)), max(16, _next_power_of_2(shape.seq_k))
  out = []
  for bq in sorted(set(blocks)):
    for bk in sorted(set(blocks)):
      if bq > max_q or bk > max_k:
        continue
      for warps in sorted(set(num_warps)):
        for stages in sorted(set(num_stages)):
          c = Candidate(bq, bk, warps, stages)
          if shared_memory_bytes(c, shape.head_dim, dtype) <= limit:
            out.append(c)
  return out


# ---------------------------------------------------------------------------------------
# Timing


def _inputs(shape: Shape, dtype, seed: int = 0):
  import jax
  keys = jax.random.split(jax.random.key(seed), 6)
  q_shape = (shape.batch, shape.seq_q, shape.heads, shape.head_dim)
  k_shape = (shape.batch, shape.seq_k, shape.heads, shape.head_dim)
  return [jax.random.normal(k, q_shape if i in (0, 3) else k_shape).astype(dtype)
          for i, k in enumerate(keys)]


def kernel_fn(kernel: str, candidate: Candidate, *, interpret: bool) -> Callable:
  """The kernel called `kernel` with the candidate's settings, as a function of its inputs."""
  if kernel not in KERNELS:
    raise ValueError(f'flash_autotune: unknown kernel {kernel!r}; choose one of {KERNELS}.')
  from fmjax.models import flash_jvp
  return functools.partial(flash_jvp.attention_and_tangent, interpret=interpret, **candidate.as_dict())


def time_candidate(shape, dtype, candidate: Candidate, *, kernel: str = 'jvp', interpret: bool = False,
                   warmup: int = 2, repeats: int = 10, inputs=None) -> float:
  """Median seconds of one call of the kernel with `candidate`'s settings: compiled once
  (outside the timing), `warmup` untimed calls, then `repeats` timed calls each ended by
  jax.block_until_ready. A candidate that fails to compile or run scores infinity."""
  import jax
  shape = _check_shape(shape)
  args = inputs if inputs is not None else _inputs(shape, dtype)
  fn = jax.jit(kernel_fn(kernel, candidate, interpret=interpret))
  try:
    compiled = fn.lower(*args).compile()
    for _ in range(warmup):
      jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(max(repeats, 1)):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      times.append(time.perf_counter() - start)
  except Exception as e:   # noqa: BLE001 -- e.g. Triton out of shared memory: skip this one
    warnings.warn(f'flash_autotune: {candidate} failed ({type(e).__name__}: '
                  f'{" ".join(str(e).split())[:200]}); skipped.')
    return math.inf
  return statistics.median(times)


class SearchResult(NamedTuple):
  best: Candidate
  seconds: float
  timings: list          # [(Candidate, seconds)] in the order timed


def search(shape, dtype, *, kernel: str = 'jvp', device_kind: str | None = None,
           candidate_list: list[Candidate] | None = None, timer: Callable[[Candidate], float] | None = None,
           interpret: bool = False, warmup: int = 2, repeats: int = 10, verbose: bool = False) -> SearchResult:
  """The fastest candidate for `shape` and `dtype`: every candidate timed by `timer(candidate)`
  (default `time_candidate` on the current device, inputs made once and shared)."""
  shape = _check_shape(shape)
  if device_kind is None:
    device_kind = current_device_kind()
  if candidate_list is None:
    candidate_list = candidates(shape, dtype, device_kind)
  if not candidate_list:
    raise ValueError(f'flash_autotune: no candidate fits {shape} ({dtype}) on {device_kind!r}; '
                     'pass candidate_list or a larger shared_memory limit.')
  if timer is None:
    args = _inputs(shape, dtype)

    def timer(c: Candidate) -> float:
      return time_candidate(shape, dtype, c, kernel=kernel, interpret=interpret, warmup=warmup,
                            repeats=repeats, inputs=args)
  timings = []
  for c in candidate_list:
    seconds = float(timer(c))
    timings.append((c, seconds))
    if verbose:
      print(f'{c}: {1e3 * seconds:.3f} ms', file=sys.stderr, flush=True)
  best, seconds = min(timings, key=lambda t: t[1])
  if not math.isfinite(seconds):
    raise RuntimeError(f'flash_autotune: every candidate failed for {shape} ({dtype}) on {device_kind!r}.')
  return SearchResult(best, seconds, timings)


# ---------------------------------------------------------------------------------------
# The cache


def cache_path() -> str:
  root = os.environ.get('FMJAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'fmjax')
  return os.path.join(root, 'flash_autotune.json')


def current_device_kind() -> str:
  import jax
  return jax.devices()[0].device_kind


def _dtype_name(dtype) -> str:
  import jax.numpy as jnp
  return jnp.dtype(dtype).name


def cache_key(shape, dtype, device_kind: str, kernel: str = 'jvp') -> str:
  """'device kind|batch|seq_q|seq_k|heads|head_dim|dtype|kernel', the cache's key."""
  shape = _check_shape(shape)
  return '|'.join([device_kind, *(str(x) for x in shape), _dtype_name(dtype), kernel])


def load_cache(path: str | None = None) -> dict:
  """The cache's entries; {} for a missing file, and {} with one warning for one that is not
  a JSON object of entries (a corrupt file is ignored, never an error). The file is parsed
  once per version (path, inode, size, modification time): `tuned_blocks` runs for every
  attention layer a model traces."""
  path = path or cache_path()
  try:
    st = os.stat(path)
  except OSError:
    return {}
  return dict(_read_cache(path, st.st_ino, st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=16)
def _read_cache(path: str, inode: int, size: int, mtime_ns: int) -> dict:
  del inode, size, mtime_ns   # the version: part of the memo's key only
  try:
    with open(path) as f:
      data = json.load(f)
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
      raise ValueError('not a JSON object of entries')
    return data
  except (OSError, ValueError) as e:
    warnings.warn(f'flash_autotune: ignoring the unreadable cache {path} ({e}); delete it or rerun '
                  '`python -m fmjax.models.flash_autotune` to rewrite it.')
    return {}


def store(shape, dtype, result: SearchResult, *, device_kind: str, kernel: str = 'jvp',
          path: str | None = None) -> str:
  """Adds `result` to the cache (read, update, written atomically: a temporary file in the same
  directory renamed over the cache). Returns the key."""
  path = path or cache_path()
  key = cache_key(shape, dtype, device_kind, kernel)
  data = load_cache(path)
  data[key] = {**result.best.as_dict(), 'seconds': result.seconds, 'candidates': len(result.timings)}
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, temp = tempfile.mkstemp(dir=directory, prefix='.flash_autotune.', suffix='.json')
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(data, f, indent=1, sort_keys=True)
    os.replace(temp, path)
  except BaseException:
    if os.path.exists(temp):
      os.unlink(temp)
    raise
  return key


def tuned_blocks(shape, dtype, kernel: str = 'jvp', *, device_kind: str | None = None,
                 path: str | None = None) -> dict | None:
  """{'block_q', 'block_k', 'num_warps', 'num_stages'} cached for this shape, dtype, kernel and
  device kind (default: the first device's), or None. Reads the cache only: no timing, so it
  can be called while jax traces (shapes are static there)."""
  if device_kind is None:
    device_kind = current_device_kind()
  entry = load_cache(path).get(cache_key(shape, dtype, device_kind, kernel))
  if entry is None:
    return None
  try:
    return {k: int(entry[k]) for k in Candidate._fields}
  except (KeyError, TypeError, ValueError):
    warnings.warn(f'flash_autotune: ignoring a malformed cache entry for {shape} ({entry!r}).')
    return None


# ---------------------------------------------------------------------------------------
# The command line


def main(argv=None) -> SearchResult:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--seq', type=int, required=True, help='query and key length (tokens)')
  parser.add_argument('--seq_k', type=int, default=0, help='key length when it differs from --seq')
  parser.add_argument('--heads', type=int, required=True)
  parser.add_argument('--head_dim', type=int, required=True)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--kernel', default='jvp', choices=KERNELS)
  parser.add_argument('--blocks', default=','.join(map(str, BLOCKS)), help='comma-separated powers of two')
  parser.add_argument('--num_warps', default=','.join(map(str, NUM_WARPS)))
  parser.add_argument('--num_stages', default=','.join(map(str, NUM_STAGES)))
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--interpret', action='store_true',
                      help="Pallas' interpreter (any backend; for testing only: its times say nothing about a GPU)")
  parser.add_argument('--cache', default='', help='cache file (default $FMJAX_CACHE/flash_autotune.json '
                      'or ~/.cache/fmjax/flash_autotune.json)')
  args = parser.parse_args(argv)
  ints = lambda text: [int(x) for x in text.split(',') if x]
  shape = Shape(args.batch, args.seq, args.seq_k or args.seq, args.heads, args.head_dim)
  if min(shape) < 1:
    parser.error(f'every size must be positive, got {shape}.')
  import jax
  import jax.numpy as jnp
  try:
    dtype = jnp.dtype(args.dtype)
  except TypeError:
    parser.error(f'unknown dtype {args.dtype!r} (e.g. bfloat16, float16, float32).')
  if jax.default_backend() != 'gpu' and not args.interpret:
    parser.error(f'the current backend is {jax.default_backend()!r}: the kernel is tuned on a GPU. '
                 'Pass --interpret to run the search in Pallas\' interpreter anyway (testing only).')
  device_kind = current_device_kind()
  try:
    found = candidates(shape, dtype, device_kind, blocks=ints(args.blocks), num_warps=ints(args.num_warps),
                       num_stages=ints(args.num_stages))
  except ValueError as e:
    parser.error(str(e))
  print(f'{len(found)} candidates for {shape} {dtype.name} on {device_kind}', file=sys.stderr)
  result = search(shape, dtype, kernel=args.kernel, device_kind=device_kind, candidate_list=found,
                  interpret=args.interpret, warmup=args.warmup, repeats=args.repeats, verbose=True)
  key = store(shape, dtype, result, device_kind=device_kind, kernel=args.kernel, path=args.cache or None)
  print(f'fastest {result.best.as_dict()} at {1e3 * result.seconds:.3f} ms; cached as {key!r} in '
        f'{args.cache or cache_path()}')
  return result


if __name__ == '__main__':
  main()
