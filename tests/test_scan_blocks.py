"""Scanned DiT blocks (fmjax.models.dit, `scan_blocks=True`): the same network, one compiled body.

The scanned DiT stores its blocks' parameters stacked along a leading depth axis and runs them
with one lax.scan. It must be the unrolled network exactly: the same initialization from the
same seed (stacked), the same loss and gradient for a rule that differentiates through the jvp
tangent (LSD) and one that stops it (MeanFlow), with and without remat inside the scan, on a
class-conditional DiT with two-time conditioning; the same numbers sharded over a 4 x 2
(data x FSDP) mesh and with the flash kernels inside the scan; a program whose size does not
grow with the depth; and a scanned run that trains, saves and loads through the training system.
"""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fmjax import benchmarking, configs, flow_maps, from_config, interpolants, losses, models
from fmjax.models import dit, flops
from fmjax.steering import finetune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = dict(image_size=8, in_channels=4, patch_size=2, hidden=32, depth=3, num_heads=2, num_classes=10,
          time_conditioning='t_gap', time_frequency_dim=32)
BATCH = 16


def _moved(pure):
  # adaLN-Zero and the zero final layer would make most gradients vanish: move off zero.
  return jax.tree.map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size).reshape(p.shape)).astype(p.dtype), pure)


@functools.lru_cache(maxsize=None)
def _unrolled_params():
  return _moved(nnx.to_pure_dict(nnx.state(models.build('dit', seed=3, **KW))))


def _loss(scan, remat, rule, depth=KW['depth']):
  graphdef, _ = nnx.split(models.abstract('dit', scan_blocks=scan, remat=remat, **{**KW, 'depth': depth}))
  apply = lambda p, s, t, x, labels=None: nnx.merge(graphdef, p)(s, t, x, labels)
  interp = interpolants.linear()
  return losses.make(rule, flow_maps.make('displacement', apply, interp), interp, diagonal_fraction=0.25)


def _batch():
  return {'x1': jax.random.normal(jax.random.PRNGKey(1), (BATCH, 8, 8, 4)), 'labels': jnp.arange(BATCH) % 10}


@functools.lru_cache(maxsize=None)
def _loss_and_grad(scan, remat, rule):
  params = _unrolled_params()
  if scan:
    params = dit.stack_block_params(params, KW['depth'])
  loss = _loss(scan, remat, rule)
  step = jax.jit(jax.value_and_grad(lambda p: loss(p, _batch(), jax.random.PRNGKey(4))[0]),
                 compiler_options=models.FAST_COMPILE)
  return step(loss.init(params, jax.random.PRNGKey(0)))


def test_scanned_network_is_built_as_the_unrolled_one_stacked():
  unrolled = nnx.to_pure_dict(nnx.state(models.build('dit', seed=5, **KW)))
  scanned = nnx.to_pure_dict(nnx.state(models.build('dit', seed=5, scan_blocks=True, **KW)))
  assert jax.tree.structure(scanned) == jax.tree.structure(dit.stack_block_params(unrolled, KW['depth']))
  assert scanned['blocks']['qkv']['kernel'].shape == (KW['depth'], 32, 96)
  jax.tree.map(np.testing.assert_array_equal, scanned, dit.stack_block_params(unrolled, KW['depth']))
  # Blocks are initialized apart (the scan does not reuse one draw), and the conversion inverts.
  assert not np.allclose(scanned['blocks']['qkv']['kernel'][0], scanned['blocks']['qkv']['kernel'][1])
  jax.tree.map(np.testing.assert_array_equal, dit.unstack_block_params(scanned), unrolled)
  # The analytic FLOP count sees the same network.
  assert (flops.dit_forward(models.abstract('dit', scan_blocks=True, **KW))
          == flops.dit_forward(models.abstract('dit', **KW)))


@pytest.mark.parametrize('rule,remat', [('lsd', 'none'), ('lsd', 'dots'), ('meanflow', 'block')])
def test_scanned_blocks_give_the_same_loss_and_gradient(rule, remat):
  loss, grad = _loss_and_grad(False, 'none', rule)
  norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grad))))
  assert norm > 0
  loss_s, grad_s = _loss_and_grad(True, remat, rule)
  np.testing.assert_allclose(float(loss_s), float(loss), rtol=1e-6)
  # Every block's gradient, each back in its own slot of the stack: a scan that reused one
  # block's parameters, or ran the blocks out of order, moves these.
  grad_s = {**grad_s, 'net': dit.unstack_block_params(grad_s['net'])}   # the rule's tree holds the net
  assert jax.tree.structure(grad_s) == jax.tree.structure(grad)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * norm), grad_s, grad)


def test_remat_acts_inside_the_scan():
  # What LSD's loss keeps for its backward pass (from the jaxpr): the scan's stacked residuals
  # shrink under each policy as the unrolled blocks' do (tests/test_remat.py).
  kept = {}
  for remat in ('none', 'dots', 'block'):
    loss = _loss(True, remat, 'lsd')
    params = loss.init(dit.stack_block_params(_unrolled_params(), KW['depth']), jax.random.PRNGKey(0))
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _batch())
    kept[remat] = benchmarking.saved_residual_bytes(lambda p, b: loss(p, b, jax.random.PRNGKey(4))[0],
                                                    params, batch)
  assert kept['block'] < kept['dots'] < kept['none'], kept
  assert kept['block'] < 0.25 * kept['none'], kept


def _dot_count(scan, depth):
  loss = _loss(scan, 'none', 'lsd', depth)
  params = _unrolled_params() if depth == KW['depth'] else _moved(
      nnx.to_pure_dict(nnx.state(models.build('dit', seed=3, **{**KW, 'depth': depth}))))
  if scan:
    params = dit.stack_block_params(params, depth)
  text = jax.jit(jax.grad(lambda p: loss(p, _batch(), jax.random.PRNGKey(4))[0])).lower(
      loss.init(params, jax.random.PRNGKey(0))).as_text()
  return text.count('stablehlo.dot_general')


def test_the_scanned_program_does_not_grow_with_depth():
  # LSD's gradient through the jvp: the unrolled program repeats each block's matmuls (forward,
  # tangent, both backwards) per block; the scanned one holds them once.
  unrolled = {d: _dot_count(False, d) for d in (2, 4)}
  scanned = {d: _dot_count(True, d) for d in (2, 4)}
  assert unrolled[4] > unrolled[2] + 20, unrolled
  assert scanned[4] == scanned[2], scanned
  assert scanned[4] < 0.6 * unrolled[4], (scanned, unrolled)


def test_scanned_blocks_match_sharded_over_data_and_fsdp():
  """The scanned LSD step's loss and gradient on a 4 x 2 mesh, every array FSDP-sharded
  (along the largest divisible axis: not the depth axis), equal the unrolled step's on one device."""
  script = textwrap.dedent(f'''
      import jax, jax.numpy as jnp, numpy as np
      import test_scan_blocks as t
      from fmjax import sharding
      from fmjax.models import dit
      assert jax.device_count() == 8
      loss, grad = t._loss_and_grad(False, 'none', 'lsd')
      lsd = t._loss(True, 'none', 'lsd')
      params = lsd.init(dit.stack_block_params(t._unrolled_params(), {KW['depth']}), jax.random.PRNGKey(0))
      mesh = sharding.make_mesh(data=4, fsdp=2)
      shardings = sharding.state_shardings(params, mesh, min_size=64)
      kernel = shardings['net']['blocks']['fc1']['kernel'].spec
      assert kernel[0] is None and 'fsdp' in kernel, kernel
      with jax.set_mesh(mesh):
        batch = jax.device_put(t._batch(), sharding.batch_sharding(mesh))
        step = jax.jit(jax.value_and_grad(lambda p, b: lsd(p, b, jax.random.PRNGKey(4))[0]),
                       in_shardings=(shardings, sharding.batch_sharding(mesh)))
        loss_s, grad_s = step(jax.device_put(params, shardings), batch)
      norm = float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grad))))
      np.testing.assert_allclose(float(loss_s), float(loss), rtol=1e-5)
      grad_s = jax.device_get(grad_s)
      grad_s = {{**grad_s, 'net': dit.unstack_block_params(grad_s['net'])}}
      jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * norm), grad_s, grad)
      print('MATCH')
  ''')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, 'tests')]))
  result = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0 and 'MATCH' in result.stdout, result.stderr[-4000:]


def test_config_option_and_conversion_errors():
  config = configs.base_config()
  config.model.name = 'dit'
  config.model.scan_blocks = True
  configs.resolve(config)   # accepted for the DiT
  config.model.name = 'mlp'
  with pytest.raises(configs.ConfigError, match=r"Unknown option\(s\) \['scan_blocks'\] for the mlp network"):
    configs.resolve(config)
  stacked = nnx.to_pure_dict(nnx.state(models.build('dit', scan_blocks=True, **KW)))
  with pytest.raises(ValueError, match=r'blocks \[0, 1, 2\] are missing.*already stacked'):
    dit.stack_block_params(stacked, KW['depth'])
  with pytest.raises(ValueError, match='disagree on the leading'):
    dit.unstack_block_params({'blocks': {'a': np.zeros((3, 2)), 'b': np.zeros((2, 2))}})


def test_a_scanned_run_trains_saves_and_loads(tmp_path):
  """Through the training system: `--config.model.scan_blocks=True` trains, checkpoints and
  loads (fmjax.load) with stacked parameters, and the loaded flow map is the unrolled network's
  on the unstacked parameters."""
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  try:
    import train_throughput as throughput   # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  import fmjax   # pylint: disable=import-outside-toplevel
  from fmjax import main   # pylint: disable=import-outside-toplevel
  from fmjax.data import pipelines   # pylint: disable=import-outside-toplevel
  config, shape = throughput.rule_config('dit-b2', 'lsd', tiny=True, batch=4, scan_blocks=True)
  with config.unlocked():
    config.train.num_steps = config.train.checkpoint_every = 2
    config.train.log_every, config.train.eval_every = 1, 0
    config.eval.ema_index = -1   # load the raw parameters (two updates move them)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(pipelines, 'make_source', lambda c, mesh: throughput.SyntheticSource(c, mesh, shape))
    main.run(config, str(tmp_path), 'train')
  model = fmjax.load(str(tmp_path))
  assert model.config.model.scan_blocks and model.step == 2
  net = jax.device_get(model.params)   # the network's parameters (the rule's 'net')
  depth = int(model.config.model.depth)
  assert np.shape(net['blocks']['qkv']['kernel'])[0] == depth
  options = {k: v for k, v in configs.model_in_force(model.config).items()
             if k in models.option_types() and k not in ('name', 'scan_blocks') and v is not None}
  unrolled = models.build('dit', example_shape=shape, num_classes=int(model.num_classes),
                          **{**options, 'scan_blocks': False})
  graphdef, _ = nnx.split(unrolled)
  x = jax.random.normal(jax.random.PRNGKey(7), (3, *shape))
  labels = jnp.array([0, 1, 2]) % max(int(model.num_classes), 1) if model.num_classes else None
  s, t = jnp.full((3,), 0.2), jnp.full((3,), 0.9)
  out = nnx.merge(graphdef, dit.unstack_block_params(jax.device_get(net)))(s, t, x, labels)
  assert float(jnp.max(jnp.abs(out))) > 0   # two updates moved the zero-initialized output layer
  flow_map = model.flow_map(s, t, x, labels)
  np.testing.assert_allclose(flow_map, x + (t - s)[:, None, None, None] * out, rtol=1e-5, atol=1e-5)

  # Reward fine-tuning of the unrolled network from this scanned base run starts at its
  # parameters, unstacked in the jitted initialization.
  from fmjax import train   # pylint: disable=import-outside-toplevel
  finetune_config, _ = throughput.rule_config('dit-b2', 'lsd', tiny=True, batch=4, scan_blocks=False)
  with finetune_config.unlocked():
    finetune_config.loss.name = 'reward_backprop'
    finetune_config.teacher.workdir, finetune_config.teacher.step = str(tmp_path), 2
    finetune_config.eval.ema_index = -1
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(pipelines, 'make_source', lambda c, mesh: throughput.SyntheticSource(c, mesh, shape))
    setup = train.Setup(finetune_config, str(tmp_path / 'finetune'))
  start = jax.device_get(setup.init_state()['params']['net'])
  assert sorted(start['blocks']) == [str(i) for i in range(depth)]
  jax.tree.map(np.testing.assert_array_equal, start, from_config._to_str_keys(dit.unstack_block_params(net)))


def test_flash_kernels_run_inside_the_scan():
  """attention='flash' (the Pallas forward+jvp kernel and the fused backward of the tangent, in
  interpret mode) inside the scan body: the jvp and LSD's gradient through it equal the unrolled
  network's."""
  kw = {**KW, 'depth': 2, 'attention': 'flash', 'attention_options': {'interpret': True}}
  params = _moved(nnx.to_pure_dict(nnx.state(models.build('dit', seed=3, **kw))))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
  s, t, labels = jnp.array([0.1, 0.3]), jnp.array([0.6, 0.9]), jnp.array([1, 2])

  def tangent_energy(scan):
    graphdef, _ = nnx.split(models.abstract('dit', scan_blocks=scan, **kw))

    def energy(p):
      _, dy = jax.jvp(lambda x: nnx.merge(graphdef, p)(s, t, x, labels), (x,), (x,))
      return jnp.sum(dy ** 2)
    return jax.value_and_grad(energy)

  value, grad = tangent_energy(False)(params)
  value_s, grad_s = tangent_energy(True)(dit.stack_block_params(params, 2))
  np.testing.assert_allclose(float(value_s), float(value), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               dit.unstack_block_params(grad_s), grad)


@pytest.mark.parametrize('base_scan', [False, True])
def test_reward_finetuning_starts_from_a_base_of_the_other_layout(base_scan):
  """from_config.base_params_layout: a base model whose network differs only in scan_blocks is
  converted to the fine-tuned network's layout (both ways, exactly); any other difference is
  the one clear error before training."""
  unrolled = _unrolled_params()
  as_stored = lambda tree: from_config._to_str_keys(tree)   # checkpoints hold string keys
  base_params = as_stored(dit.stack_block_params(unrolled, KW['depth']) if base_scan else unrolled)
  target_scan = not base_scan
  # A network initializer as from_config.build_network gives one (only its shapes are read).
  initializer = lambda **kw: lambda key: jax.tree.map(
      lambda a: jnp.zeros(a.shape, a.dtype), as_stored(nnx.to_pure_dict(nnx.state(models.abstract('dit', **kw)))))
  net_init = initializer(scan_blocks=target_scan, **KW)
  base = finetune.BaseModel(flow_map=None, velocity=None, params=base_params)
  convert = from_config.base_params_layout(net_init, base)
  start = jax.jit(convert)(base_params)
  expected = as_stored(dit.stack_block_params(unrolled, KW['depth']) if target_scan else unrolled)
  assert jax.tree.structure(start) == jax.tree.structure(expected)
  jax.tree.map(np.testing.assert_array_equal, start, expected)
  # The same layout passes through unchanged; another width is the shape error.
  same = from_config.base_params_layout(lambda key: base_params, base)
  assert same(base_params) is base_params
  wider = initializer(scan_blocks=target_scan, **{**KW, 'hidden': 64})
  with pytest.raises(configs.ConfigError, match='another shape'):
    from_config.base_params_layout(wider, base)
