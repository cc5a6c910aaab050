"""The autotune harness of the fused jvp attention kernel: candidate filtering, the search with
an injected timer, the JSON cache (round trip, corrupt file, keys), the CLI's refusal off GPU,
and one real search in Pallas' interpreter at a tiny shape."""

import json
import math
import os
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.models import flash_autotune as fa

SHAPE = fa.Shape(batch=2, seq_q=256, seq_k=256, heads=4, head_dim=64)


def test_shared_memory_estimate_written_out():
  """bf16, D=64, blocks 128 x 64, 3 stages: 2 * (3*4*64*64 + 2*128*64 + 2*128*64) bytes."""
  c = fa.Candidate(128, 64, 4, 3)
  assert fa.shared_memory_bytes(c, 64, jnp.bfloat16) == 2 * (3 * 4 * 64 * 64 + 2 * 128 * 64 + 2 * 128 * 64)
  # head_dim 72 is padded to 128; float32 doubles every tile
  assert fa.shared_memory_bytes(c, 72, jnp.float32) == 2 * fa.shared_memory_bytes(c, 128, jnp.bfloat16)


def test_candidates_respect_shapes_and_limits():
  h100 = fa.candidates(SHAPE, jnp.bfloat16, 'NVIDIA H100 80GB HBM3')
  a100 = fa.candidates(SHAPE, jnp.bfloat16, 'NVIDIA A100-SXM4-80GB')
  assert h100 and a100
  for c in h100:
    assert c.block_q & (c.block_q - 1) == 0 and c.block_k & (c.block_k - 1) == 0
    assert 16 <= c.block_q <= 256 and 16 <= c.block_k <= 256
    assert fa.shared_memory_bytes(c, 64, jnp.bfloat16) <= 227 * 1024
  for c in a100:
    assert fa.shared_memory_bytes(c, 64, jnp.bfloat16) <= 163 * 1024
  # the A100's smaller limit drops candidates the H100 keeps: 64 x 128 blocks, 2 stages need
  # 2 * (2*4*128*64 + 2*64*64 + 2*64*128) = 180224 bytes (176 KiB)
  assert set(a100) < set(h100)
  assert fa.Candidate(64, 128, 4, 2) in h100 and fa.Candidate(64, 128, 4, 2) not in a100
  assert fa.Candidate(64, 128, 4, 3) not in h100
  # a short sequence: no block beyond its padded length (100 -> 128)
  short = fa.candidates(fa.Shape(1, 100, 40, 2, 32), jnp.float16, 'NVIDIA H100 80GB HBM3')
  assert max(c.block_q for c in short) == 128 and max(c.block_k for c in short) == 64
  # an explicit limit: exactly the candidates whose estimate fits
  tight = fa.candidates(SHAPE, jnp.bfloat16, 'cpu', shared_memory=40 * 1024)
  everything = fa.candidates(SHAPE, jnp.bfloat16, 'cpu')
  assert len(everything) == 5 * 5 * 2 * 4   # blocks 16..256 for q and k, warps, stages
  assert tight == [c for c in everything if fa.shared_memory_bytes(c, 64, jnp.bfloat16) <= 40 * 1024]
  with pytest.raises(ValueError, match='powers of two'):
    fa.candidates(SHAPE, jnp.bfloat16, 'cpu', blocks=(48,))


def test_search_picks_the_fastest_with_an_injected_timer():
  cands = fa.candidates(SHAPE, jnp.bfloat16, 'NVIDIA H100 80GB HBM3')
  # a made-up cost with one minimum; one candidate "fails" (inf) and must not win
  cost = lambda c: (abs(math.log2(c.block_q) - 6) + abs(math.log2(c.block_k) - 5)
                    + 0.1 * abs(c.num_stages - 2) + 0.01 * (c.num_warps == 8))
  seen = []

  def timer(c):
    seen.append(c)
    return math.inf if c == fa.Candidate(16, 16, 4, 1) else cost(c)

  result = fa.search(SHAPE, jnp.bfloat16, device_kind='NVIDIA H100 80GB HBM3', candidate_list=cands,
                     timer=timer)
  assert seen == cands
  assert result.best == fa.Candidate(64, 32, 4, 2)
  assert result.seconds == 0.0 and len(result.timings) == len(cands)
  with pytest.raises(RuntimeError, match='every candidate failed'):
    fa.search(SHAPE, jnp.bfloat16, device_kind='x', candidate_list=cands[:2], timer=lambda c: math.inf)


def _result(bq=64, bk=32, warps=4, stages=2, seconds=1e-3):
  return fa.SearchResult(fa.Candidate(bq, bk, warps, stages), seconds, [])


def test_cache_round_trip_and_keys(tmp_path, monkeypatch):
  monkeypatch.setenv('FMJAX_CACHE', str(tmp_path))
  assert fa.cache_path() == str(tmp_path / 'flash_autotune.json')
  h100 = 'NVIDIA H100 80GB HBM3'
  assert fa.tuned_blocks(SHAPE, jnp.bfloat16, device_kind=h100) is None   # no file yet
  fa.store(SHAPE, jnp.bfloat16, _result(), device_kind=h100)
  fa.store(SHAPE, jnp.float16, _result(128, 64, 8, 3), device_kind=h100)
  fa.store(SHAPE, jnp.bfloat16, _result(32, 16, 4, 1), device_kind='NVIDIA A100-SXM4-80GB')
  assert fa.tuned_blocks(SHAPE, jnp.bfloat16, device_kind=h100) == dict(block_q=64, block_k=32, num_warps=4,
                                                                        num_stages=2)
  assert fa.tuned_blocks(SHAPE, 'float16', device_kind=h100)['block_q'] == 128
  assert fa.tuned_blocks(SHAPE, jnp.bfloat16, device_kind='NVIDIA A100-SXM4-80GB')['block_q'] == 32
  assert fa.tuned_blocks(SHAPE._replace(batch=3), jnp.bfloat16, device_kind=h100) is None
  assert fa.tuned_blocks(SHAPE, jnp.bfloat16, kernel='other', device_kind=h100) is None
  keys = {fa.cache_key(SHAPE, d, k) for d in (jnp.bfloat16, jnp.float16) for k in (h100, 'A100')}
  assert len(keys) == 4
  assert fa.cache_key(SHAPE, jnp.bfloat16, h100) == 'NVIDIA H100 80GB HBM3|2|256|256|4|64|bfloat16|jvp'
  data = json.loads((tmp_path / 'flash_autotune.json').read_text())
  assert len(data) == 3
  assert not [p for p in os.listdir(tmp_path) if p.startswith('.flash_autotune.')]   # no temp left


@pytest.mark.parametrize('content', ['{not json', '[1, 2]', '{"k": 3}'])
def test_corrupt_cache_warns_once_and_is_ignored(tmp_path, content):
  path = tmp_path / 'cache.json'
  path.write_text(content)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    assert fa.tuned_blocks(SHAPE, jnp.bfloat16, device_kind='cpu', path=str(path)) is None
  assert len(caught) == 1 and 'ignoring the unreadable cache' in str(caught[0].message)
  # storing over a corrupt file replaces it with a valid one
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    fa.store(SHAPE, jnp.bfloat16, _result(), device_kind='cpu', path=str(path))
  assert fa.tuned_blocks(SHAPE, jnp.bfloat16, device_kind='cpu', path=str(path))['block_k'] == 32


def test_cli_refuses_off_gpu_without_interpret(tmp_path, capsys):
  import jax
  if jax.default_backend() == 'gpu':
    pytest.skip('the refusal is for non-GPU backends')
  with pytest.raises(SystemExit):
    fa.main(['--seq', '64', '--heads', '2', '--head_dim', '16', '--cache', str(tmp_path / 'c.json')])
  assert '--interpret' in capsys.readouterr().err
  assert not (tmp_path / 'c.json').exists()


def test_real_interpret_search_at_a_tiny_shape(tmp_path):
  """A real search through the CLI in the interpreter: 32 queries, 16 keys, blocks 16 and 32
  give two candidates (query blocks 16 and 32; key blocks stop at 16). The cached winner is
  one of them, and the kernel's outputs with it match those with the other's."""
  cache = str(tmp_path / 'c.json')
  result = fa.main(['--seq', '32', '--seq_k', '16', '--heads', '1', '--head_dim', '16', '--batch', '1',
                    '--dtype', 'float32', '--blocks', '16,32', '--num_warps', '4', '--num_stages', '1',
                    '--warmup', '1', '--repeats', '2', '--interpret', '--cache', cache])
  assert [c for c, _ in result.timings] == [fa.Candidate(16, 16, 4, 1), fa.Candidate(32, 16, 4, 1)]
  assert all(math.isfinite(s) and s > 0 for _, s in result.timings)
  assert result.seconds == min(s for _, s in result.timings)
  import jax
  shape = fa.Shape(1, 32, 16, 1, 16)
  blocks = fa.tuned_blocks(shape, jnp.float32, device_kind=jax.devices()[0].device_kind, path=cache)
  assert fa.Candidate(**blocks) == result.best
  args = fa._inputs(shape, jnp.float32)
  outputs = [fa.kernel_fn('jvp', c, interpret=True)(*args) for c, _ in result.timings]
  for a, b in zip(*outputs):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
