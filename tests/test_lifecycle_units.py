"""The run lifecycle's small parts, no training run: the EMA update and its warm-up against a
plain numpy loop (decays 0.9 and 0.999, warm-up on and off, a skipped update), which EMA copy a
restore picks, the warm-up's default per rule, the weights line, ctrl-C and SIGTERM handling,
and the config checks that stop a run before it starts."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import fmjax.main
from fmjax import configs, train, train_state

def _numpy_ema(initial, param_steps, decay, warmup, skipped=()):
  """e_{t+1} = d_t e_t + (1 - d_t) p_{t+1}, d_t = min(decay, (1 + t) / (10 + t)) with warm-up;
  t counts every update, and a skipped update leaves e alone."""
  e = np.asarray(initial, np.float64)
  for t, p in enumerate(param_steps):
    if t in skipped:
      continue
    d = min(decay, (1.0 + t) / (10.0 + t)) if warmup else decay
    e = d * e + (1.0 - d) * np.asarray(p, np.float64)
  return e


@pytest.mark.parametrize('warmup', [False, True])
def test_ema_update_matches_a_numpy_loop(warmup):
  rng = np.random.default_rng(0)
  decays = (0.9, 0.999)
  initial = rng.normal(size=(3, 2)).astype(np.float32)
  params = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(12)]
  ema = [jnp.asarray(initial), jnp.asarray(initial)]
  update = jax.jit(lambda ema, p, t: train_state.ema_update(ema, p, decays, t, warmup))
  for t, p in enumerate(params):
    ema = update(ema, jnp.asarray(p), jnp.int32(t))
  for copy, decay in zip(ema, decays):
    np.testing.assert_allclose(copy, _numpy_ema(initial, params, decay, warmup), rtol=2e-6, atol=2e-6)
  # The two settings really differ at these decays (a warm-up that did nothing would pass above
  # only if the loop ignored it too).
  assert not np.allclose(_numpy_ema(initial, params, 0.999, True), _numpy_ema(initial, params, 0.999, False),
                         atol=1e-2)


def test_ema_decay_at_closed_form():
  assert train_state.ema_decay_at(0.999, 0, False) == 0.999
  assert float(train_state.ema_decay_at(0.999, 0, True)) == pytest.approx(0.1)
  assert float(train_state.ema_decay_at(0.999, 90, True)) == pytest.approx(0.91)
  assert float(train_state.ema_decay_at(0.9, 80, True)) == pytest.approx(0.9)     # 81/90 > 0.9
  assert float(train_state.ema_decay_at(0.9, 79, True)) == pytest.approx(80 / 89)


class _Quadratic:
  """loss = sum((w - mean(x1))^2): SGD moves w toward the batch mean; x1[0,0] > 100 -> NaN."""

  def init(self, net, key):
    del key
    return {'net': net}

  def __call__(self, params, batch, key):
    del key
    loss = jnp.sum((params['net']['w'] - batch['x1'].mean(0)) ** 2)
    return jnp.where(batch['x1'][0, 0] > 100, jnp.nan, loss), {}


@pytest.mark.parametrize('warmup', [False, True])
def test_train_step_ema_follows_the_loop_with_skipped_updates(warmup):
  """The jitted step's EMA copies (decays 0.9, 0.999) against the numpy loop fed the step's own
  parameters; update 3 is non-finite (skipped, but it still counts for the warm-up)."""
  decays = (0.9, 0.999)
  tx = optax.sgd(0.15)
  rule = _Quadratic()
  state = train_state.init_state(rule, lambda key: {'w': jnp.array([0.3, -0.2, 0.7])}, tx, decays,
                                 jax.random.PRNGKey(0))
  step = jax.jit(train_state.make_train_step(rule, tx, decays, ema_warmup=warmup))
  rng = np.random.default_rng(1)
  seen = []
  for t in range(9):
    x1 = rng.normal(2.0, 1.0, size=(5, 3)).astype(np.float32)
    if t == 3:
      x1[0, 0] = 1e3
    state, _ = step(state, {'x1': jnp.asarray(x1)}, jnp.zeros((1,), jnp.int32))
    seen.append(np.asarray(state['params']['net']['w']))
  assert int(state['nonfinite_total']) == 1
  for copy, decay in zip(state['ema'], decays):
    np.testing.assert_allclose(copy['w'], _numpy_ema([0.3, -0.2, 0.7], seen, decay, warmup, skipped={3}),
                               rtol=2e-6, atol=2e-6)


def test_ema_warmup_default_is_on_only_for_fine_tuning():
  c = configs.base_config()
  assert configs.resolve(c).optim.ema_warmup is False
  for rule in ('reward_distill', 'reward_backprop'):
    c = configs.base_config()
    c.loss.name, c.teacher.workdir = rule, '/some/base/run'
    assert configs.resolve(c).optim.ema_warmup is True
  c = configs.base_config()
  c.optim.ema_warmup = True                      # an explicit choice wins
  assert configs.resolve(c).optim.ema_warmup is True
  # A config saved before the option existed trained without warm-up and resumes that way.
  c = configs.base_config()
  c.loss.name, c.teacher.workdir = 'reward_distill', '/some/base/run'
  saved = json.loads(configs.resolve(c).to_json_best_effort())
  del saved['optim']['ema_warmup']
  assert configs.resolve(ml_collections.ConfigDict(saved)).optim.ema_warmup is False


def test_describe_weights():
  assert (train_state.describe_weights((0.999,), 0, 300) ==
          'EMA copy 0 (decay 0.999, no warm-up) of step 300')
  # With warm-up, the last update (t = 299) used min(0.999, 300 / 309) = 0.9709.
  assert (train_state.describe_weights((0.5, 0.999), 1, 300, True) ==
          'EMA copy 1 (decay 0.999 with warm-up: 0.9709 at the last update) of step 300')
  assert train_state.describe_weights((0.999,), -1, 7) == 'raw training parameters (no EMA) of step 7'


def test_select_params_picks_copies_by_number_not_by_name():
  """Orbax restores an EMA list as a dict keyed '0'..'10': copy 10 is the eleventh, not the third."""
  state = {'params': {'net': 'raw'}, 'ema': {str(i): f'copy{i}' for i in range(11)}}
  assert [train_state.select_params(state, i) for i in (0, 2, 9, 10)] == ['copy0', 'copy2', 'copy9', 'copy10']
  assert train_state.select_params(state, -1) == 'raw'
  with pytest.raises(ValueError, match='keeps 11 EMA copies'):
    train_state.select_params(state, 11)


# ----------------------------------------------------------------------- ctrl-C


def test_a_second_ctrl_c_exits_at_once_a_second_sigterm_does_not(capfd):
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  with train._Preemption() as preemption:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)          # a repeated preemption notice: still a save
    assert preemption.requested and preemption.signal_name == 'SIGTERM'
  with train._Preemption() as preemption:
    os.kill(os.getpid(), signal.SIGINT)
    assert preemption.requested and preemption.signal_name == 'SIGINT'
    assert 'ctrl-C again exits at once' in capfd.readouterr().err
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
  # main's exit status per signal: 75 asks a scheduler to requeue, 130 is the shell's ctrl-C.
  assert train.EXIT_CODES == {'SIGTERM': 75, 'SIGINT': 130}


# ----------------------------------------------------------------------- before a run starts


def _config():
  c = configs.base_config()
  c.data.name, c.data.dim = 'gaussian', 2
  return c


@pytest.mark.parametrize('lr', [-1e-3, 0.0, float('nan'), float('inf')])
def test_a_learning_rate_that_cannot_train_is_refused_up_front(tmp_path, lr):
  config = _config()
  config.optim.learning_rate = lr
  with pytest.raises(configs.ConfigError, match=r'config.optim.learning_rate = .* must be a finite number > 0'):
    fmjax.main.run(config, str(tmp_path), 'train')
  assert not os.path.exists(tmp_path / 'checkpoints')
  config.optim.learning_rate = 2e-4
  configs.resolve(config)


def test_usage_names_every_mode():
  allowed = fmjax.main.flags.FLAGS['mode'].parser.enum_values
  assert '--mode=' + '|'.join(allowed) in fmjax.main.__doc__
  assert set(allowed) == {'train', 'eval', 'sample', 'steer'}
