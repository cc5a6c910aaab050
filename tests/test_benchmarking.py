"""fmjax.benchmarking: XLA's cost and memory numbers, call timing with fake clocks, the table."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import benchmarking


def test_matmul_flops_are_two_m_n_k():
  m, k, n = 8, 16, 4
  compiled, seconds = benchmarking.compile(lambda a, b: a @ b, jnp.ones((m, k)), jnp.ones((k, n)))
  assert seconds >= 0
  cost = benchmarking.xla_cost(compiled)
  assert cost['flops'] == 2 * m * n * k   # XLA:CPU counts a multiply-add as 2 FLOPs
  assert cost['bytes_accessed'] == 4 * (m * k + k * n + m * n)   # float32 inputs read, output written
  lowered = jax.jit(lambda a, b: a @ b).lower(jnp.ones((m, k)), jnp.ones((k, n)))
  assert benchmarking.xla_cost(lowered)['flops'] == 2 * m * n * k
  np.testing.assert_allclose(compiled(jnp.ones((m, k)), jnp.ones((k, n))), np.full((m, n), float(k)))


def test_compile_keeps_a_jitted_functions_options():
  step = jax.jit(lambda x: x + 1, donate_argnums=0)
  compiled, _ = benchmarking.compile(step, jnp.zeros(3), compiler_options={'xla_backend_optimization_level': 0})
  x = jnp.zeros(3)
  assert float(compiled(x)[0]) == 1.0 and x.is_deleted()   # donated: the jit's own option kept


def test_temp_bytes_of_a_program_with_a_temporary():
  # The sort's input, sin(x) @ x^T, is neither an argument nor the output: a temporary buffer.
  x = jnp.ones((64, 64))
  compiled, _ = benchmarking.compile(lambda x: jnp.sort(jnp.sin(x) @ x.T, axis=0) @ x, x)
  assert benchmarking.temp_bytes(compiled) > 0


def test_saved_residual_bytes_counts_what_the_backward_reads():
  p = jnp.linspace(0.1, 1.0, 1000)            # float32: 4,000 bytes per residual
  x = jnp.full((1000,), 2.0, jnp.float32)
  nested = lambda p, x: jnp.sum(jnp.sin(jnp.sin(p * x)))
  # Reverse mode keeps cos(p x) and cos(sin(p x)), and x from the multiply, an input (not counted).
  assert benchmarking.saved_residual_bytes(nested, p, x) == 2 * 4000
  # Checkpointed: only the function's inputs are kept, and they are arguments.
  assert benchmarking.saved_residual_bytes(jax.checkpoint(nested), p, x) == 0
  # Shapes alone suffice: nothing runs.
  shape = jax.ShapeDtypeStruct((1000,), jnp.float32)
  assert benchmarking.saved_residual_bytes(nested, shape, shape) == 2 * 4000


class FakeProgram:
  def __init__(self, cost=None, memory=None, fail=False):
    self.cost, self.memory, self.fail = cost, memory, fail

  def cost_analysis(self):
    if self.fail:
      raise NotImplementedError('no cost model')
    return self.cost

  def memory_analysis(self):
    return self.memory


@pytest.mark.parametrize('form', [
    {'flops': 6.0, 'bytes accessed': 40.0},              # current jax: a dict
    [{'flops': 6.0, 'bytes accessed': 40.0}, {'flops': 1.0}],   # older jax: one dict per program
    ({'flops': 6.0, 'bytes accessed': 40.0},),
])
def test_cost_forms(form):
  assert benchmarking.xla_cost(FakeProgram(form)) == {'flops': 6.0, 'bytes_accessed': 40.0}


@pytest.mark.parametrize('program', [FakeProgram(None), FakeProgram([]), FakeProgram({}),
                                     FakeProgram(fail=True)])
def test_no_cost_is_nan(program):
  cost = benchmarking.xla_cost(program)
  assert set(cost) == {'flops', 'bytes_accessed'} and all(math.isnan(v) for v in cost.values())


def test_no_memory_analysis_is_nan():
  assert math.isnan(benchmarking.temp_bytes(FakeProgram(memory=None)))
  assert benchmarking.temp_bytes(FakeProgram(memory=type('M', (), {'temp_size_in_bytes': 12})())) == 12.0


class Clock:
  """A fake clock that returns the given readings in turn and logs each reading."""

  def __init__(self, readings, log, name):
    self.readings, self.log, self.name = iter(readings), log, name

  def __call__(self):
    self.log.append(self.name)
    return next(self.readings)


class Output:
  """A fake asynchronous result: jax.block_until_ready calls its block_until_ready."""

  def __init__(self, log):
    self.log = log

  def block_until_ready(self):
    self.log.append('wait')
    return self


def test_time_calls_counts_calls_and_takes_the_median_of_the_timed_ones():
  log = []

  def fn():
    log.append('call')
    return Output(log)

  wall = Clock([0.0, 1.0, 10.0, 13.0, 20.0, 22.0], log, 'wall')   # calls of 1, 3 and 2 s
  cpu = Clock([0.0, 0.5, 1.0, 2.5, 3.0, 4.0], log, 'cpu')          # 0.5, 1.5 and 1 s
  timing = benchmarking.time_calls(fn, repeats=3, warmup=2, clock=wall, cpu_clock=cpu)
  assert log.count('call') == 5
  assert timing.times == [1.0, 3.0, 2.0] and timing.median_s == 2.0
  assert timing.cpu_times == [0.5, 1.5, 1.0] and timing.cpu_s_per_call == 1.0
  # Warm-up calls read no clock; every timed call is waited for before the clocks stop.
  assert log[:4] == ['call', 'wait'] * 2
  assert log[4:] == ['wall', 'cpu', 'call', 'wait', 'wall', 'cpu'] * 3


def test_interleaved_alternates_the_functions():
  log = []
  fns = {name: (lambda name=name: log.append(name)) for name in ('a', 'b')}
  wall = Clock([0, 1, 1, 4, 4, 6, 6, 7], [], 'wall')   # a: 1, 2; b: 3, 1
  cpu = Clock([0] * 8, [], 'cpu')
  timings = benchmarking.interleaved(fns, repeats=2, warmup=1, clock=wall, cpu_clock=cpu)
  assert log == ['a', 'b'] * 3
  assert timings['a'].times == [1, 2] and timings['a'].median_s == 1.5
  assert timings['b'].times == [3, 1] and timings['b'].median_s == 2


def test_bad_repeats():
  with pytest.raises(ValueError, match='repeats >= 1'):
    benchmarking.time_calls(lambda: None, repeats=0)
  with pytest.raises(ValueError, match='repeats >= 1'):
    benchmarking.interleaved({'a': lambda: None}, repeats=0)


def test_markdown_table():
  text = benchmarking.markdown_table(['rule', 'ms'], [['lsd', f'{1.234:.1f}'], ['fm', '']])
  assert text == '| rule | ms |\n|---|---|\n| lsd | 1.2 |\n| fm |  |'
  assert benchmarking.markdown_table(['n', 'mode'], [], align=['right', '']) == '| n | mode |\n|---:|---|'
  assert benchmarking.markdown_row([1, 'x']) == '| 1 | x |'
  with pytest.raises(ValueError, match='2 columns'):
    benchmarking.markdown_table(['a', 'b'], [['only one']])
  with pytest.raises(ValueError, match='align'):
    benchmarking.markdown_table(['a'], [], align=['middle'])


def test_write_creates_the_folder(tmp_path):
  path = tmp_path / 'new' / 'folder' / 'table.md'
  benchmarking.write(str(path), 'text\n')
  assert path.read_text() == 'text\n'
