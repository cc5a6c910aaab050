"""fmjax.models.flops against XLA's own FLOP count, and the throughput benchmark's smoke run.

XLA's count is its cost analysis of the unoptimized HLO (`jax.jit(f).lower(...).cost_analysis()`,
no compile, so these tests are cheap). The analytic count leaves out elementwise work
(norms, activations, softmax), so it must sit a little below XLA's: at the small sizes here
within 3.5 % (measured 1.3-2.1 % on the DiT and the U-Net, forward and every rule's step).
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fmjax import flow_maps, interpolants, losses, models
from fmjax.models import attention, flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 10
NETS = {
    'dit': dict(image_size=16, in_channels=4, patch_size=2, hidden=128, depth=2, num_heads=4),
    'unet': dict(image_size=16, in_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(8,), channels_per_head=32),
}
LOWER = 0.965   # analytic / XLA: elementwise ops (a few % here) are not in the analytic count


def _xla_flops(fn, *args) -> float:
  analysis = jax.jit(fn).lower(*args).cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis['flops'])


def _xla_step_flops(loss, module, params, batch_size: int) -> float:
  """XLA:CPU's count of one loss-and-gradient step on a labelled batch of `module`'s images."""
  shape = (batch_size, module.image_size, module.image_size, module.in_channels)
  batch = {'x1': jax.ShapeDtypeStruct(shape, jnp.float32),
           'labels': jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
  rule_params = jax.eval_shape(lambda: loss.init(
      jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), params), jax.random.PRNGKey(0)))
  step = lambda p, b, k: jax.value_and_grad(lambda pp: loss(pp, b, k)[0])(p)
  return _xla_flops(step, rule_params, batch, jax.random.PRNGKey(0))


def _net(name):
  module = models.abstract(name, num_classes=NUM_CLASSES, **NETS[name])
  graphdef, params = nnx.split(module)
  apply = lambda p, s, t, x, labels=None: nnx.merge(graphdef, p)(s, t, x, labels)
  x = jax.ShapeDtypeStruct((2, module.image_size, module.image_size, module.in_channels), jnp.float32)
  return module, apply, params, x


@pytest.mark.parametrize('name', sorted(NETS))
def test_forward_matches_xla(name):
  module, apply, params, x = _net(name)
  times = jax.ShapeDtypeStruct((2,), jnp.float32)
  ratio = flops.forward(module).total * 2 / _xla_flops(apply, params, times, times, x)
  assert LOWER < ratio <= 1.0, ratio


def test_attention_matches_xla():
  q = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.float32)
  ratio = flops.attention_flops(256, 256) / _xla_flops(attention.naive_attention, q, q, q)
  assert LOWER < ratio <= 1.0, ratio


def test_conv_taps_leave_out_padding():
  # 3x3 'SAME' on 8x8: 3 * 8 - 2 taps per axis land inside the input.
  conv = nnx.eval_shape(lambda: nnx.Conv(2, 5, (3, 3), rngs=nnx.Rngs(0)))
  assert flops.conv_flops(conv, 8) == (2.0 * 22 * 22 * 2 * 5, 8)
  strided = nnx.eval_shape(lambda: nnx.Conv(4, 6, (2, 2), strides=2, padding='VALID', rngs=nnx.Rngs(0)))
  assert flops.conv_flops(strided, 8) == (2.0 * 8 * 8 * 4 * 6, 4)


def test_dit_b2_forward_is_the_papers_23_gmacs():
  # DiT Table 1 lists DiT-B/2 at 23.01 "Gflops" (multiply-adds, per 256x256 image as a
  # 32x32x4 latent); our count is 2 FLOPs per multiply-add and skips the tiny label gather.
  gmacs = flops.forward(models.abstract('DiT-B/2', num_classes=1000)).total / 2e9
  assert abs(gmacs - 23.01) < 0.1, gmacs


# (rule, rule options, flops options): every rule the benchmark times, all rows off-diagonal
# (where the jvp multiples show), and flow matching all diagonal.
RULES = [('flow_matching', {}, {}), ('lsd', {}, {}), ('meanflow', {}, {}), ('imf', {}, {}),
         ('meanflow', dict(omega=2.0, kappa=0.5), dict(guidance=True, kappa=0.5))]


@pytest.mark.parametrize('name', ['dit'])
@pytest.mark.parametrize('rule,options,extra', RULES, ids=[r[0] + ('+cfg' if r[1] else '') for r in RULES])
def test_step_matches_xla(name, rule, options, extra):
  module, apply, params, _ = _net(name)
  batch_size = 8
  interp = interpolants.linear()
  options = dict(options, null_label=NUM_CLASSES)
  if rule != 'flow_matching':
    options['diagonal_fraction'] = 0.0
  loss = losses.make(rule, flow_maps.make('displacement', apply, interp), interp, **options)
  xla = _xla_step_flops(loss, module, params, batch_size)
  fraction = 1.0 if rule == 'flow_matching' else 0.0
  analytic = flops.step_flops(rule, flops.forward(module), batch_size, fraction, **extra)
  assert LOWER < analytic / xla <= 1.0, analytic / xla


@pytest.mark.parametrize('velocity_head', [False, True])
def test_imf_guidance_conditioning_step_matches_xla(velocity_head):
  """iMF as its preset trains it: omega drawn per row as a network input (so the stopped v_c
  and v_u passes run on every row), with and without the auxiliary velocity head, on both
  off-diagonal and diagonal rows."""
  module = models.abstract('dit', num_classes=NUM_CLASSES, guidance_conditioning=True,
                           velocity_head=velocity_head, **NETS['dit'])
  graphdef, params = nnx.split(module)
  apply = lambda p, s, t, x, labels=None, head='average': nnx.merge(graphdef, p)(s, t, x, labels, head=head)
  interp = interpolants.linear()
  loss = losses.make('imf', flow_maps.make('displacement', apply, interp), interp,
                     null_label=NUM_CLASSES, diagonal_fraction=0.5, guidance_conditioning=True,
                     velocity_head_weight=1.0 if velocity_head else 0.0)
  batch_size = 8
  xla = _xla_step_flops(loss, module, params, batch_size)
  analytic = flops.step_flops('imf', flops.forward(module), batch_size, 0.5,
                              guidance_conditioning=True, velocity_head=velocity_head)
  assert LOWER < analytic / xla <= 1.0, analytic / xla
  with pytest.raises(ValueError, match='iMF options'):
    flops.rule_row_costs('meanflow', flops.forward(module), guidance_conditioning=True)


def test_unet_lsd_step_matches_xla():
  module, apply, params, _ = _net('unet')
  interp = interpolants.linear()
  loss = losses.make('lsd', flow_maps.make('displacement', apply, interp), interp, diagonal_fraction=0.5)
  batch = {'x1': jax.ShapeDtypeStruct((4, 16, 16, 3), jnp.float32)}
  rule_params = jax.eval_shape(lambda: loss.init(
      jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), params), jax.random.PRNGKey(0)))
  step = lambda p, b, k: jax.value_and_grad(lambda pp: loss(pp, b, k)[0])(p)
  xla = _xla_flops(step, rule_params, batch, jax.random.PRNGKey(0))
  analytic = flops.step_flops('lsd', flops.forward(module), 4, 0.5)
  assert LOWER < analytic / xla <= 1.0, analytic / xla


def test_peak_table():
  assert flops.peak_bf16_flops('NVIDIA H100 80GB HBM3') == 989.4e12
  assert flops.peak_bf16_flops('NVIDIA H100 PCIe') == 756e12
  assert flops.peak_bf16_flops('NVIDIA H200') == 989.4e12
  assert flops.peak_bf16_flops('cpu') is None


def _throughput_module():
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  try:
    import train_throughput
  finally:
    sys.path.pop(0)
  return train_throughput


def test_throughput_benchmark_tiny_runs(tmp_path):
  """The benchmark end to end at CPU size, rows compiled in parallel then timed: the trainer's
  step compiles, runs, and its table carries the analytic and XLA counts and the time/FLOP
  ratio line of the bound aimed for (no timing asserted)."""
  train_throughput = _throughput_module()
  out = tmp_path / 'table.md'
  rows = train_throughput.main(['--model', 'dit-b2', '--tiny', '--batch', '4', '--rules',
                                'flow_matching,meanflow', '--attention', 'naive', '--remat', 'none,block',
                                '--warmup', '0', '--repeats', '1', '--compile_workers', '2', '--out', str(out)])
  assert [(r['rule'], r['attention'], r['remat']) for r in rows] == [
      ('flow_matching', 'naive', 'none'), ('flow_matching', 'naive', 'block'),
      ('meanflow', 'naive', 'none'), ('meanflow', 'naive', 'block')]
  for row in rows:
    assert 'error' not in row, row
    assert jnp.isfinite(row['loss']) and row['step_s'] > 0 and row['compile_s'] > 0
  for plain, remat in (rows[0:2], rows[2:4]):
    assert 0.7 < plain['model_flops'] / plain['xla_flops'] <= 1.0   # tiny widths: elementwise ops weigh more
    # XLA counts the blocks' recomputation in the backward pass: about one more forward of the
    # blocks (measured 1.27x for flow matching, 1.25x for MeanFlow at this size).
    assert 1.1 < remat['xla_flops'] / plain['xla_flops'] < 1.4, (remat['xla_flops'], plain['xla_flops'])
  text = out.read_text()
  flop_ratio = rows[2]['model_flops'] / rows[0]['model_flops']
  assert f'- meanflow (naive attention) / flow matching: time {rows[2]["step_s"] / rows[0]["step_s"]:.3f}, ' \
         f'FLOPs {flop_ratio:.3f}' in text
  # Remat rows: against flow matching under the same policy, and against the rule without remat;
  # the analytic count is the model's (recomputation is not model FLOPs).
  assert rows[1]['model_flops'] == rows[0]['model_flops']
  assert f'- meanflow (naive attention, remat block) / flow matching: time {rows[3]["step_s"] / rows[1]["step_s"]:.3f}' in text
  assert f'- meanflow (naive attention) with remat block / without: time {rows[3]["step_s"] / rows[2]["step_s"]:.3f}' in text
  columns = train_throughput.HEADER.count('|')
  assert all(line.count('|') == columns for line in text.splitlines() if line.startswith('| dit-b2'))


def test_throughput_benchmark_scanned_blocks(tmp_path):
  """Scanned DiT blocks are a row axis: the same model FLOPs and first loss (the same network
  and initial state), and the ratio line compares them with the unrolled row."""
  train_throughput = _throughput_module()
  out = tmp_path / 'table.md'
  rows = train_throughput.main(['--model', 'dit-b2', '--tiny', '--batch', '4', '--rules', 'lsd',
                                '--attention', 'naive', '--blocks', 'unrolled,scanned', '--warmup', '0',
                                '--repeats', '1', '--out', str(out)])
  unrolled, scanned = rows
  assert (unrolled['blocks'], scanned['blocks']) == ('unrolled', 'scanned')
  assert 'error' not in scanned and jnp.isfinite(scanned['loss'])
  assert scanned['model_flops'] == unrolled['model_flops']
  # XLA counts a loop body once: the scanned row leaves its XLA count blank, not wrong.
  assert np.isnan(scanned['xla_flops']) and not np.isnan(unrolled['xla_flops'])
  assert train_throughput.format_row(scanned).count('|') == train_throughput.HEADER.count('|')
  # The same initial state and batch: the first step's loss is the same function's.
  assert abs(scanned['loss'] - unrolled['loss']) <= 1e-5 * abs(unrolled['loss'])
  assert f"- lsd (naive attention, remat none) scanned / unrolled blocks: time {scanned['step_s'] / unrolled['step_s']:.3f}" \
      in out.read_text()


def test_throughput_benchmark_rows_without_timing():
  """Skipped, failed and compiled-but-untimed rows keep the table's columns; bad arguments are
  refused before any compile."""
  train_throughput = _throughput_module()
  rows = train_throughput.main(['--model', 'unet', '--tiny', '--rules', 'lsd,sct', '--attention',
                                'naive,flash', '--budget_s', '1e-9'])
  assert len(rows) == 4 and all(r['error'].startswith('skipped') for r in rows)
  columns = train_throughput.HEADER.count('|')
  untimed = dict(preset='dit-b2', rule='lsd', attention='naive', batch=4, dtype='bfloat16', diag=0.25,
                 model_flops=1e9, xla_flops=1.1e9, temp_gib=0.5, compile_s=3.0)
  for row in rows + [untimed, train_throughput._error_row('unet', 'imf', 'flash', 'block', True, MemoryError('oom'))]:
    assert train_throughput.format_row(row).count('|') == columns, row
  assert 'compiled, not timed' in train_throughput.format_row(untimed)
  for bad in (['--rules', 'mf'], ['--attention', 'fast'], ['--remat', 'blocks'], ['--blocks', 'scan']):
    with pytest.raises(SystemExit):
      train_throughput.main(['--tiny'] + bad)
