"""Pieces of the training system in one process: the non-finite guard, the learning-rate
schedule, checkpoint keep policy, interrupted-save cleanup and the incompatible-config error."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmjax import checkpointing, configs, train_state


class _Rule:
  """A quadratic loss that is NaN on batches flagged bad: sum((w - x1)^2)."""

  def init(self, net_params, key=None):
    return {'net': net_params}

  def __call__(self, params, batch, key):
    loss = jnp.sum((params['net']['w'] - batch['x1'].mean(0)) ** 2)
    loss = jnp.where(batch['x1'][0, 0] > 100, jnp.nan, loss)
    return loss, {'quadratic': loss}


def _state_and_step(lr=0.1, decays=(0.5,), stop=False):
  tx = optax.sgd(lr)
  rule = _Rule()
  state = train_state.init_state(rule, lambda key: {'w': jnp.zeros(2)}, tx, decays,
                                 jax.random.PRNGKey(0))
  step = jax.jit(train_state.make_train_step(rule, tx, decays))
  requests = jnp.array([0, int(stop)], jnp.int32)   # one process's flag among two devices
  return state, lambda state, batch: step(state, batch, requests)


def test_step_updates_params_ema_and_counter():
  state, step = _state_and_step()
  new, metrics = step(state, {'x1': jnp.ones((4, 2))})
  # One SGD step on sum((w - 1)^2) from w = 0: w = 0.1 * 2 = 0.2; EMA(0.5) = 0.1.
  np.testing.assert_allclose(new['params']['net']['w'], [0.2, 0.2], rtol=1e-6)
  np.testing.assert_allclose(new['ema'][0]['w'], [0.1, 0.1], rtol=1e-6)
  assert int(new['step']) == 1 and float(metrics['loss']) == pytest.approx(2.0)
  assert not bool(metrics['stop_requested'])
  assert bool(_state_and_step(stop=True)[1](state, {'x1': jnp.ones((4, 2))})[1]['stop_requested'])


def test_non_finite_steps_are_skipped_and_counted():
  state, step = _state_and_step()
  good, bad = {'x1': jnp.ones((4, 2))}, {'x1': jnp.full((4, 2), 1e3)}
  state, _ = step(state, good)
  w = np.asarray(state['params']['net']['w'])
  for i in range(3):
    state, metrics = step(state, bad)
    assert int(metrics['skipped_updates']) == i + 1 and int(metrics['nonfinite_run']) == i + 1
  np.testing.assert_array_equal(state['params']['net']['w'], w)     # untouched
  assert int(state['nonfinite_run']) == 3 and int(state['nonfinite_total']) == 3
  state, _ = step(state, good)
  assert int(state['nonfinite_run']) == 0 and int(state['nonfinite_max_run']) == 3
  assert int(state['step']) == 5


def test_an_update_whose_gradient_norm_overflows_is_skipped():
  """Gradients of 1e30 are each finite, but their global norm overflows float32: such an update
  is skipped and counted like a NaN one (plain SGD would move w by 1e29)."""
  class Linear:
    def init(self, net_params, key=None):
      return {'net': net_params}

    def __call__(self, params, batch, key):
      loss = jnp.sum(params['net']['w'] * batch['x1'].mean(0))   # 0 at w = 0, gradient x1
      return loss, {}

  tx = optax.sgd(0.1)
  state = train_state.init_state(Linear(), lambda key: {'w': jnp.zeros(2)}, tx, (),
                                 jax.random.PRNGKey(0))
  step = jax.jit(train_state.make_train_step(Linear(), tx, ()))
  state, metrics = step(state, {'x1': jnp.full((4, 2), 1e30)}, jnp.zeros((1,), jnp.int32))
  assert np.isfinite(float(metrics['loss'])) and not np.isfinite(float(metrics['grad_norm']))
  np.testing.assert_array_equal(state['params']['net']['w'], [0.0, 0.0])
  assert int(metrics['skipped_updates']) == 1 and int(state['nonfinite_run']) == 1


def test_schedule_warmup_then_cosine():
  optim = configs.base_config().optim
  optim.learning_rate, optim.warmup_steps, optim.schedule = 1.0, 10, 'cosine'
  schedule = train_state.learning_rate_schedule(optim, num_steps=110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(60)) == pytest.approx(0.5, abs=1e-6)     # half-way down the cosine
  assert float(schedule(110)) == pytest.approx(0.0, abs=1e-6)


def _tiny_state(value):
  return {'w': jnp.full((3,), value, jnp.float32), 'step': jnp.int32(value)}


def test_keep_last_n_and_every_k(tmp_path):
  config = configs.base_config()
  manager = checkpointing.make_manager(str(tmp_path), keep=2, keep_every=4, async_save=False)
  for step in range(1, 11):
    checkpointing.save(manager, step, _tiny_state(step), config, {'next_index': step}, {})
  manager.wait_until_finished()
  assert sorted(manager.all_steps()) == [4, 8, 9, 10]
  _, data, _ = checkpointing.restore_json(manager, 9)
  assert data == {'next_index': 9}
  restored = checkpointing.restore_state(manager, 8, jax.eval_shape(lambda: _tiny_state(0)))
  np.testing.assert_array_equal(restored['w'], np.full(3, 8.0))
  manager.close()


def test_interrupted_save_is_cleaned_and_never_loaded(tmp_path):
  config = configs.base_config()
  manager = checkpointing.make_manager(str(tmp_path), async_save=False)
  checkpointing.save(manager, 5, _tiny_state(5), config, {}, {})
  manager.close()
  # What a kill during the save of step 10 leaves behind.
  leftover = tmp_path / 'checkpoints' / '10.orbax-checkpoint-tmp'
  (leftover / 'state').mkdir(parents=True)
  (leftover / 'state' / 'garbage').write_text('half-written')
  manager = checkpointing.make_manager(str(tmp_path))
  assert manager.latest_step() == 5
  manager.wait_until_finished()
  assert not leftover.exists()
  manager.close()


def test_incompatible_config_is_named(tmp_path):
  config = configs.base_config()
  saved = json.loads(config.to_json_best_effort())
  checkpointing.check_compatible(saved, config, str(tmp_path))            # same config: fine
  other = configs.base_config()
  other.model.hidden = 32
  other.loss.name = 'meanflow'
  other.train.num_steps = 99                                              # not structural
  with pytest.raises(checkpointing.IncompatibleCheckpointError) as err:
    checkpointing.check_compatible(saved, other, str(tmp_path))
  message = str(err.value)
  assert 'model.hidden: checkpoint has 256' in message and 'loss.name' in message
  assert 'num_steps' not in message and 'fresh --workdir' in message


def test_validate_rejects_inconsistent_gmm():
  config = configs.base_config()
  config.data.means = ((0.0, 0.0), (1.0, 1.0))
  config.data.stds = (0.3,)
  with pytest.raises(configs.ConfigError, match='K = 2'):
    configs.validate(config)
  config.data.stds = (0.3, 0.3)
  config.data.dim = 3
  with pytest.raises(configs.ConfigError, match='config.data.dim'):
    configs.validate(config)
