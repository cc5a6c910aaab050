"""The command line end to end on a toy config (train, eval, then fmjax.load and sample),
and the errors a user meets first: a misspelt key, a bad value."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import checkpointing

from train_testlib import ROOT, env_with_devices

TINY = ['--config.train.num_steps=8', '--config.train.batch_size=32', '--config.train.log_every=4',
        '--config.train.checkpoint_every=4', '--config.model.hidden=16', '--config.model.depth=2',
        '--config.model.time_dim=8', '--config.eval.num_samples=128', '--config.eval.steps=(1,2)',
        '--config.optim.ema_decays=(0.5,)', '--config.loss.name=flow_matching']


def _main(*args, timeout=300):
  return subprocess.run([sys.executable, '-m', 'fmjax.main', *map(str, args)], cwd=ROOT,
                        env=env_with_devices(1), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('cli')
  result = _main('--config=experiments/toy_gmm.py', f'--workdir={workdir}', *TINY)
  assert result.returncode == 0, result.stderr[-5000:]
  return workdir, result


def test_train_writes_logs_checkpoints_samples_and_metrics(trained):
  workdir, result = trained
  out = result.stdout
  assert 'steps/s' in out and 'ETA' in out and 'loss' in out
  assert 'few-step evaluation at step 8' in out
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['4', '8']
  assert os.path.exists(workdir / 'samples' / 'step_8.png')
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir / 'tensorboard'))
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert set(final['few_step']) == {'1', '2'}
  # The metric is a real distance: the samples of an 8-step model are far from the target,
  # two draws of the target are close.
  assert final['few_step']['1']['energy_distance'] > 5 * abs(final['target_vs_target']['energy_distance'])
  config = json.loads((workdir / 'config.json').read_text())
  assert config['train']['num_steps'] == 8 and config['data']['name'] == 'gmm'
  # Every option in force is recorded, the rule's and the network's defaults included.
  assert config['loss']['diagonal_fraction'] == 1.0 and config['loss']['times']['name'] == 'uniform'
  assert (config['model']['hidden'], config['model']['time_scale']) == (16, 100.0)
  assert config['model']['model_channels'] is None and config['data']['dim'] == 2


def test_eval_mode_reproduces_the_final_metrics(trained):
  workdir, _ = trained
  before = json.loads((workdir / 'final_metrics.json').read_text())
  result = _main('--config=experiments/toy_gmm.py', f'--workdir={workdir}', '--mode=eval', *TINY)
  assert result.returncode == 0, result.stderr[-5000:]
  after = json.loads((workdir / 'final_metrics.json').read_text())
  assert after == before


def test_load_and_sample(trained):
  import fmjax
  import fmjax.api
  workdir, _ = trained
  model = fmjax.load(str(workdir))
  assert model.step == 8 and model.example_shape == (2,)
  key = jax.random.PRNGKey(3)
  x = model.sample(key, 64, steps=2)
  assert x.shape == (64, 2) and bool(jnp.all(jnp.isfinite(x)))
  # An explicit uniform grid is the same sampler as steps=2.
  np.testing.assert_allclose(model.sample(key, 64, times=[0.0, 0.5, 1.0]), x, rtol=1e-6)
  # Two 1-step jumps by hand = the 2-step sampler.
  x0 = model.noise(key, 64)
  by_hand = model.flow_map(0.5, 1.0, model.flow_map(0.0, 0.5, x0))
  np.testing.assert_allclose(by_hand, x, rtol=1e-5, atol=1e-6)
  # X_{s,s} = x, and scalar times equal [batch] times.
  np.testing.assert_allclose(model.flow_map(0.3, 0.3, x0), x0, atol=1e-6)
  np.testing.assert_allclose(model.velocity(0.3, x0), model.velocity(jnp.full((64,), 0.3), x0))
  # EMA (decay 0.5) and raw parameters are different weights.
  raw = fmjax.api.load(str(workdir), ema=-1)
  assert not np.allclose(raw.velocity(0.3, x0), model.velocity(0.3, x0))
  with pytest.raises(checkpointing.CheckpointError, match='saved steps'):
    fmjax.api.load(str(workdir), step=5)
  with pytest.raises(ValueError, match='unconditional'):
    model.sample(key, 4, labels=jnp.zeros(4, jnp.int32))


def test_sample_mode_writes_png(trained):
  workdir, _ = trained
  result = _main('--config=experiments/toy_gmm.py', f'--workdir={workdir}', '--mode=sample',
                 '--config.sample.num=50', '--config.sample.steps=2')
  assert result.returncode == 0, result.stderr[-5000:]
  x = np.load(workdir / 'samples' / 'samples_8_2steps.npy')
  assert x.shape == (50, 2)
  assert os.path.exists(workdir / 'samples' / 'samples_8_2steps.png')


def test_misspelt_key_is_one_clean_line(tmp_path):
  # The one subprocess check of the error path: absl and ml_collections raise it inside flag
  # parsing; the other messages are tested in-process (test_configs.py).
  result = _main('--config=experiments/toy_gmm.py', f'--workdir={tmp_path}',
                 '--config.train.nmu_steps=3', timeout=120)
  assert result.returncode != 0
  assert result.stderr.strip() == ("fmjax: --config.train.nmu_steps: no such config key 'nmu_steps'. "
                                   'Did you mean "num_steps" instead of "nmu_steps"?')
  assert not os.path.exists(tmp_path / 'checkpoints')     # nothing ran


@pytest.mark.parametrize('key, value, message', [
    ('data.name', 'imagenet', "config.data.name = 'imagenet'"),
    ('optim.ema_decays', (1.5,), 'ema_decays entries must be in [0, 1)'),
])
def test_bad_value_stops_before_any_work(tmp_path, key, value, message):
  from fmjax import configs, main
  config = configs.base_config()
  section, field = key.split('.')
  config[section][field] = value
  with pytest.raises(configs.ConfigError) as err:
    main.run(config, str(tmp_path), 'train')
  assert message in str(err.value)
  assert not os.path.exists(tmp_path / 'checkpoints')     # nothing ran


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
  result = _main('--config=experiments/mnist.py:flow_matching,mlp', f'--workdir={tmp_path}',
                 f'--config.data.data_dir={tmp_path}/nothing', timeout=120)
  assert result.returncode != 0
  assert 'python -m fmjax.data.mnist5k' in result.stderr
  assert 'not prepared' in result.stderr
  assert 'Traceback' not in result.stderr   # one message, not a stack
