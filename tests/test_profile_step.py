"""benchmarks/profile_step.py: the HLO parser and op classifier on hand-written HLO, and the
per-class table of a tiny DiT's loss gradient on CPU (profiler times, FLOPs against the
analytic count of fmjax.models.flops)."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
import profile_step as ps  # noqa: E402

from fmjax import models  # noqa: E402
from fmjax.models import flops as flops_lib  # noqa: E402

# A module in the form jax prints: source tables, two fused computations, an entry with a
# fusion per class, a collective, a copy and a while loop of known trip count.
HLO = '''HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[8,32]{1,0})->f32[8,96]{1,0}}

FileNames
1 "/repo/fmjax/models/attention.py"
2 "/venv/site-packages/flax/nnx/nn/linear.py"
3 "/venv/site-packages/flax/nnx/nn/normalization.py"
4 "/repo/fmjax/models/dit.py"
5 "/venv/site-packages/optax/_src/transform.py"

FunctionNames
1 "naive_attention"
2 "Linear.__call__"
3 "LayerNorm.__call__"
4 "modulate"
5 "update_moment"

FileLocations
1 {file_name_id=1 function_name_id=1 line=70 end_line=70 column=2 end_column=40}
2 {file_name_id=2 function_name_id=2 line=10 end_line=10 column=2 end_column=40}
3 {file_name_id=3 function_name_id=3 line=10 end_line=10 column=2 end_column=40}
4 {file_name_id=4 function_name_id=4 line=88 end_line=88 column=2 end_column=40}
5 {file_name_id=5 function_name_id=5 line=88 end_line=88 column=2 end_column=40}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=1}
3 {file_location_id=3 parent_frame_id=1}
4 {file_location_id=4 parent_frame_id=1}
5 {file_location_id=5 parent_frame_id=1}

%fused_dense (param_0: f32[8,32], param_1: f32[32,96]) -> f32[8,96] {
  %param_0 = f32[8,32]{1,0} parameter(0)
  %param_1 = f32[32,96]{1,0} parameter(1)
  %dot.1 = f32[8,96]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/dot_general" stack_frame_id=2}
  ROOT %add.1 = f32[8,96]{1,0} add(%dot.1, %dot.1), metadata={op_name="jit(step)/add" stack_frame_id=2}
}

%fused_scores (param_0.1: f32[2,16,8], param_1.1: f32[2,16,8]) -> f32[2,16,16] {
  %param_0.1 = f32[2,16,8]{2,1,0} parameter(0)
  %param_1.1 = f32[2,16,8]{2,1,0} parameter(1)
  ROOT %dot.2 = f32[2,16,16]{2,1,0} dot(%param_0.1, %param_1.1), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={2}, metadata={op_name="jit(step)/dot_general" stack_frame_id=1}
}

%fused_norm (param_0.2: f32[8,32]) -> f32[8,32] {
  %param_0.2 = f32[8,32]{1,0} parameter(0)
  ROOT %rsqrt.1 = f32[8,32]{1,0} rsqrt(%param_0.2), metadata={op_name="jit(step)/rsqrt" stack_frame_id=3}
}

%fused_modulate (param_0.3: f32[8,32]) -> f32[8,32] {
  %param_0.3 = f32[8,32]{1,0} parameter(0)
  ROOT %multiply.1 = f32[8,32]{1,0} multiply(%param_0.3, %param_0.3), metadata={op_name="jit(step)/mul" stack_frame_id=4}
}

%fused_adam (param_0.4: f32[8,32]) -> f32[8,32] {
  %param_0.4 = f32[8,32]{1,0} parameter(0)
  %multiply.2 = f32[8,32]{1,0} multiply(%param_0.4, %param_0.4), metadata={op_name="jit(step)/mul" stack_frame_id=5}
  ROOT %sqrt.1 = f32[8,32]{1,0} sqrt(%multiply.2), metadata={op_name="jit(step)/sqrt" stack_frame_id=5}
}

%fused_softmax_nosource (param_0.5: f32[4,16]) -> f32[4] {
  %param_0.5 = f32[4,16]{1,0} parameter(0)
  %exponential.1 = f32[4,16]{1,0} exponential(%param_0.5)
  %constant.1 = f32[] constant(0)
  ROOT %reduce.1 = f32[4]{0} reduce(%exponential.1, %constant.1), dimensions={1}, to_apply=%add_f32
}

%add_f32 (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add.9 = f32[] add(%x, %y)
}

%body (p: (s32[], f32[8,32])) -> (s32[], f32[8,32]) {
  %p = (s32[], f32[8,32]{1,0}) parameter(0)
  %gte.0 = s32[] get-tuple-element(%p), index=0
  %gte.1 = f32[8,32]{1,0} get-tuple-element(%p), index=1
  %negate.1 = f32[8,32]{1,0} negate(%gte.1)
  ROOT %tuple.1 = (s32[], f32[8,32]{1,0}) tuple(%gte.0, %negate.1)
}

%cond (p.1: (s32[], f32[8,32])) -> pred[] {
  %p.1 = (s32[], f32[8,32]{1,0}) parameter(0)
  ROOT %constant.2 = pred[] constant(false)
}

ENTRY %main.1 (x.1: f32[8,32], w.1: f32[32,96], q.1: f32[2,16,8], s.1: f32[4,16]) -> f32[8,96] {
  %x.1 = f32[8,32]{1,0} parameter(0)
  %w.1 = f32[32,96]{1,0} parameter(1)
  %q.1 = f32[2,16,8]{2,1,0} parameter(2)
  %s.1 = f32[4,16]{1,0} parameter(3)
  %dense_fusion = f32[8,96]{1,0} fusion(%x.1, %w.1), kind=kOutput, calls=%fused_dense
  %scores_fusion = f32[2,16,16]{2,1,0} fusion(%q.1, %q.1), kind=kOutput, calls=%fused_scores
  %norm_fusion = f32[8,32]{1,0} fusion(%x.1), kind=kLoop, calls=%fused_norm
  %modulate_fusion = f32[8,32]{1,0} fusion(%norm_fusion), kind=kLoop, calls=%fused_modulate
  %adam_fusion = f32[8,32]{1,0} fusion(%x.1), kind=kLoop, calls=%fused_adam
  %softmax_fusion = f32[4]{0} fusion(%s.1), kind=kLoop, calls=%fused_softmax_nosource
  %all-reduce.1 = f32[8,32]{1,0} all-reduce(%adam_fusion), replica_groups={{0,1}}, to_apply=%add_f32
  %copy.1 = f32[32,8]{0,1} copy(%x.1)
  %transpose.1 = f32[32,8]{1,0} transpose(%x.1), dimensions={1,0}
  %init = (s32[], f32[8,32]{1,0}) tuple(%constant.3, %x.1)
  %while.1 = (s32[], f32[8,32]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %bitcast.1 = f32[8,96]{1,0} bitcast(%dense_fusion)
}
'''

EXPECTED_CLASSES = {
    'dense_fusion': 'matmul/conv', 'scores_fusion': 'attention', 'norm_fusion': 'norm/modulation',
    'modulate_fusion': 'norm/modulation', 'adam_fusion': 'elementwise', 'softmax_fusion': 'attention',
    'all-reduce.1': 'collective', 'copy.1': 'layout/copy', 'transpose.1': 'layout/copy',
    'while.1': 'other', 'negate.1': 'elementwise',
}


def test_classifier_on_handwritten_hlo():
  module = ps.parse_hlo(HLO)
  assert module.name == 'jit_step' and module.entry == 'main.1'
  ops = ps.executed_ops(module)
  # bookkeeping (parameters, tuples, bitcasts, get-tuple-element) is not an executed op
  assert {n: op.cls for n, op in ops.items()} == EXPECTED_CLASSES
  assert ops['dense_fusion'].flops == 2 * 8 * 32 * 96 + 8 * 96         # the dot and the add
  assert ops['scores_fusion'].flops == 2 * 2 * 16 * 16 * 8             # batched dot
  assert ops['softmax_fusion'].flops == 4 * 16 + 4 * 16                # exp, then the reduction
  assert ops['negate.1'].count == 5 and ops['negate.1'].parent == 'while.1'
  # bytes: operands and result of the executed instruction (4 bytes per float32)
  assert ops['dense_fusion'].bytes == 4 * (8 * 32 + 32 * 96 + 8 * 96)
  assert ops['copy.1'].bytes == 4 * 2 * 8 * 32 and ops['copy.1'].flops == 0
  assert ops['while.1'].bytes == 0


def test_sites_name_the_traced_line():
  """Each executed instruction's source line: a fusion without its own frame by its members'
  most frequent one, none without source information; the site table sums times per line."""
  module = ps.parse_hlo(HLO)
  ops = ps.executed_ops(module)
  assert ops['dense_fusion'].site == 'linear.py:10 Linear.__call__'
  assert ops['scores_fusion'].site == 'attention.py:70 naive_attention'
  assert ops['modulate_fusion'].site == 'dit.py:88 modulate'
  assert ops['adam_fusion'].site == 'transform.py:88 update_moment'
  assert ops['softmax_fusion'].site == '' and ops['copy.1'].site == ''
  times = {'dense_fusion': 3.0, 'scores_fusion': 1.0, 'softmax_fusion': 0.8, 'copy.1': 0.6, 'adam_fusion': 2.0}
  rows = ps.site_table(ops, times, top=3)
  # The no-source row holds the softmax and the copy (1.4 s), its class the one that took most.
  assert [(r['site'], r['class']) for r in rows] == [
      ('linear.py:10 Linear.__call__', 'matmul/conv'), ('transform.py:88 update_moment', 'elementwise'),
      ('', 'attention')]
  assert rows[0]['time_share'] == pytest.approx(3.0 / 7.4)
  assert rows[2]['time_s'] == pytest.approx(1.4) and rows[2]['ops'] > 2
  assert '(no source)' in ps.format_sites(rows)


def test_single_lines():
  conv = ps.parse_instruction(
      '  ROOT %convolution.3 = f32[8,4,4,32]{3,2,1,0} convolution(%p0, %p1), window={size=2x2 stride=2x2}, '
      'dim_labels=b01f_01io->b01f, metadata={op_name="jit(f)/conv_general_dilated"}')
  assert conv.opcode == 'convolution' and conv.operands == ['p0', 'p1']
  shapes = {'p0': 'f32[8,8,8,4]{3,2,1,0}', 'p1': 'f32[2,2,4,32]{3,2,1,0}'}
  assert ps.instruction_flops(conv, shapes) == 2 * (8 * 4 * 4 * 32) * (2 * 2 * 4)
  assert ps._leaf_class(conv) == 'matmul/conv'
  gemm = ps.parse_instruction(
      '%custom-call.7 = (bf16[64,128]{1,0}, s8[1024]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", '
      'backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],'
      '"rhs_contracting_dimensions":["0"]}}}')
  assert ps._leaf_class(gemm) == 'matmul/conv'
  assert ps.instruction_flops(gemm, {'a': 'bf16[64,256]{1,0}', 'b': 'bf16[256,128]{1,0}'}) == 2 * 64 * 128 * 256
  fmha = ps.parse_instruction('%custom-call.8 = bf16[2,256,12,64]{3,2,1,0} custom-call(%q, %k, %v), '
                              'custom_call_target="__cudnn$fmhaSoftmax"')
  assert ps._leaf_class(fmha) == 'attention'
  for line, cls in [('%all-gather-start.2 = f32[64]{0} all-gather-start(%x), dimensions={0}', 'collective'),
                    ('%reduce-scatter.1 = f32[8]{0} reduce-scatter(%x), dimensions={0}, to_apply=%add', 'collective'),
                    ('%dynamic-update-slice.4 = f32[8,8]{1,0} dynamic-update-slice(%a, %b, %i, %j)', 'layout/copy'),
                    ('%rng-bit-generator.1 = (u64[2]{0}, u32[8]{0}) rng-bit-generator(%s), algorithm=rng_default', 'other'),
                    ('%tanh.3 = f32[8]{0} tanh(%x), metadata={op_name="jit(f)/dit/layer_norm/tanh"}', 'norm/modulation'),
                    ('%exponential.3 = f32[8]{0} exponential(%x), metadata={op_name="jit(f)/attention/exp"}', 'attention')]:
    assert ps._leaf_class(ps.parse_instruction(line)) == cls, line
  assert ps.parse_instruction('FileNames') is None
  assert ps.nbytes('(bf16[2,3]{1,0}, s8[10]{0}, pred[])') == 2 * 6 + 10 + 1


def test_no_entry_is_one_clear_error():
  with pytest.raises(ValueError, match='ENTRY'):
    ps.parse_hlo('HloModule m\n')
  with pytest.raises(ValueError, match="time_source"):
    ps.profile_compiled(None, lambda: None, time_source='guess')


@pytest.fixture(scope='module')
def tiny_dit_profile():
  """The loss gradient of DiT-tiny (8x8x3, hidden 32, depth 2, 16 tokens) at batch 4, profiled."""
  module = models.build('DiT-tiny')
  apply, params = models.functional(module)
  batch = 4
  x = models.example_input(module, batch)
  t = jnp.linspace(0.1, 0.9, batch)

  def loss(params, x):
    return jnp.mean((apply(params, t, t, x) - x) ** 2)

  compiled = jax.jit(jax.grad(loss)).lower(params, x).compile(models.FAST_COMPILE)
  result = ps.profile_compiled(compiled, lambda: jax.block_until_ready(compiled(params, x)), steps=2)
  return result, flops_lib.dit_forward(module), batch


def test_tiny_dit_shares_and_matmul_flops(tiny_dit_profile):
  result, forward, batch = tiny_dit_profile
  classes = result['classes']
  assert set(classes) == set(ps.CLASSES)
  assert result['source'] == 'profiler'       # XLA:CPU's trace names the instruction of each event
  for share in ('time_share', 'flops_share', 'bytes_share'):
    assert sum(r[share] for r in classes.values()) == pytest.approx(1.0, abs=1e-9)
  assert classes['matmul/conv']['time_s'] > 0 and classes['attention']['time_s'] > 0
  # dense layers and the patch convolution, forward and backward: 3 F_lin per example, less the
  # input gradients of the first layers (the patch convolution, the time embeddings' first
  # linear: their inputs are not differentiated), 1 % here.
  analytic = 3 * forward.linear * batch
  assert classes['matmul/conv']['flops'] == pytest.approx(analytic, rel=0.02)
  # the attention matmuls are in the attention class, not in matmul/conv
  assert classes['attention']['flops'] >= 2 * forward.attention * batch
  # the table's total against XLA's own count of the same program (it counts a few elementwise
  # ops differently): within 25 %
  total = sum(r['flops'] for r in classes.values())
  assert total == pytest.approx(result['xla_flops'], rel=0.25)
  table = ps.format_table(classes)
  assert table.count('\n') == len(ps.CLASSES) + 2 and 'matmul/conv' in table
  # Source lines: the DiT's own lines and flax's Linear carry time, and the table's time is the
  # classes' time (the top lines, at most all of it).
  sites = {r['site'].split(' ')[0].split(':')[0] for r in result['sites']}
  assert {'dit.py', 'linear.py'} <= sites, sites
  assert sum(r['time_s'] for r in result['sites']) <= sum(r['time_s'] for r in classes.values()) * (1 + 1e-9)
  assert all(o['site'] is not None and o['bytes'] >= 0 for o in result['top_ops'])


def test_cost_model_fallback_is_labelled(monkeypatch):
  """A trace without XLA events: roofline times, said so; the forward's matmul FLOPs are the
  analytic forward count exactly (batch 2)."""
  monkeypatch.setattr(ps, 'trace_op_times', lambda *a, **k: {})
  module = models.build('DiT-tiny')
  apply, params = models.functional(module)
  x = models.example_input(module, 2)
  compiled = jax.jit(lambda p, x: apply(p, 0.5, 0.5, x)).lower(params, x).compile(models.FAST_COMPILE)
  result = ps.profile_compiled(compiled, lambda: jax.block_until_ready(compiled(params, x)), steps=1)
  assert result['source'] == 'cost_model' and 'ESTIMATE' in ps.describe_source(result)
  assert sum(r['time_share'] for r in result['classes'].values()) == pytest.approx(1.0)
  linear = flops_lib.dit_forward(module).linear
  assert np.isclose(result['classes']['matmul/conv']['flops'], 2 * linear, rtol=1e-6)


def test_the_command_line_profiles_a_scanned_step():
  """`profile_step.py --blocks scanned`: the trainer's step with its DiT blocks in a while loop.
  The table counts the loop body once per trip (XLA's own total counts it once), so its matmul
  and attention FLOPs are the analytic count of the step's network passes; the source lines
  name the scan."""
  result = ps.main(['--size', 'tiny', '--batch', '8', '--blocks', 'scanned', '--steps', '1'])
  assert (result['blocks'], result['remat'], result['rule']) == ('scanned', 'none', 'flow_matching')
  classes = result['classes']
  counted = classes['matmul/conv']['flops'] + classes['attention']['flops']
  assert counted == pytest.approx(result['model_flops'], rel=0.05)
  assert result['xla_flops'] < 0.95 * counted     # the body once (0.85 measured: 2 blocks, elementwise ops)
  assert any(r['site'].startswith('dit.py:') for r in result['sites'])
