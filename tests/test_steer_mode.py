"""--mode=steer's outputs and the one reward factory.

Each run writes its own folder (named by method and options, or config.steer.name) and its
metrics.json describes the run: every config.steer option in force, the reward's options, and
the unsteered baseline (same seed, same noise rows, config.steer.steps steps) beside the steered
metrics, both recomputed here from the saved samples and from `fmjax.load(...).sample`. The
reward factory `fmjax.steering.rewards.from_config` is checked against the formulas written out,
and is the one list of names behind both config.steer.reward and config.finetune.reward."""

import json
import os

import jax
import numpy as np
import pytest

from test_api_fixtures import NUM_CLASSES, toy_config, train_conditional

from fmjax import configs
from fmjax.steering import rewards


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return str(train_conditional(tmp_path_factory.mktemp('steer_mode')))


def _steer_config(**steer):
  config = toy_config()
  config.steer.method, config.steer.num_samples, config.steer.steps = 'smc', 12, 2
  config.steer.num_particles, config.steer.temperature = 4, 0.6
  config.steer.center, config.steer.std = (4.0, 1.0), 1.5
  config.steer.label, config.steer.seed = 1, 3
  for k, v in steer.items():
    setattr(config.steer, k, v)
  return config


def _quadratic(x, center, std):
  return -0.5 * np.sum((np.asarray(x, np.float64) - center) ** 2, -1) / std**2


def test_each_run_has_its_own_folder_and_describes_itself(workdir):
  from fmjax import main
  import fmjax
  first = main.run(_steer_config(), workdir, 'steer')
  other = main.run(_steer_config(temperature=0.3, method='best_of_n'), workdir, 'steer')
  named = main.run(_steer_config(name='mine', method='guidance', lookahead='denoiser'), workdir, 'steer')
  folders = {m['folder'] for m in (first, other, named)}
  assert len(folders) == 3 and named['folder'] == os.path.join(workdir, 'steer', 'mine')
  assert os.path.basename(first['folder']).startswith('smc_quadratic_lambda0.6_steps2_particles4_label1_seed3_')
  model = fmjax.load(workdir)
  labels = np.full(12, 1, np.int32)
  for metrics, method in ((first, 'smc'), (other, 'best_of_n'), (named, 'guidance')):
    out = metrics['folder']
    saved = json.loads(open(os.path.join(out, 'metrics.json')).read())
    assert saved['method'] == method and saved['step'] == model.step
    # Every option in force, and the reward's own options beside them.
    config = _steer_config()
    assert set(saved['options']) == set(config.steer) - {'name'}
    assert saved['options']['label'] == 1 and saved['options']['seed'] == 3
    assert saved['reward_options'] == {'reward': 'quadratic', 'center': [4.0, 1.0], 'std': 1.5}
    assert 'target_class' in saved and 'classifier_dir' in saved
    x = np.load(os.path.join(out, 'samples.npy'))
    np.testing.assert_allclose(saved['mean_reward'], _quadratic(x, [4.0, 1.0], 1.5).mean(), rtol=1e-5)
    # The baseline: the unsteered 2-step sampler from the same seed's noise rows, same labels.
    base = np.load(os.path.join(out, 'baseline_samples.npy'))
    expected = model.sample(jax.random.split(jax.random.PRNGKey(3))[0], 12, steps=2, labels=labels)
    np.testing.assert_allclose(base, expected, atol=1e-5)
    b = saved['baseline']
    assert b['nfe'] == 2 and b['num_samples'] == 12
    np.testing.assert_allclose(b['mean_reward'], _quadratic(expected, [4.0, 1.0], 1.5).mean(), rtol=1e-5)
    assert {'energy_distance', 'energy_distance_floor', 'mode_mass'} <= set(b) & set(saved)
    assert saved['nfe'] > b['nfe']
  # Steering raised the reward over the baseline (lambda = 0.3 and 0.6 tilt hard toward (4, 1)).
  assert other['mean_reward'] > other['baseline']['mean_reward']
  # The same options name the same folder (a rerun replaces its own run only).
  from fmjax.cli import steer as steer_mode
  assert steer_mode.run_name(configs.resolve(_steer_config())) == os.path.basename(first['folder'])
  assert steer_mode.run_name(configs.resolve(_steer_config(std=1.4))) != os.path.basename(first['folder'])


def test_steer_label_must_be_a_class_of_the_run(workdir):
  from fmjax import main
  with pytest.raises(configs.ConfigError, match='classes 0 .. 2'):
    main.run(_steer_config(label=NUM_CLASSES), workdir, 'steer')
  with pytest.raises(configs.ConfigError, match='plain folder name'):
    main.run(_steer_config(name='../elsewhere'), workdir, 'steer')


def test_reward_factory_builds_each_name():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 2)) * 3
  block = configs.base_config().steer
  block.reward, block.center, block.std = 'quadratic', (1.0, -2.0), 1.7
  np.testing.assert_allclose(rewards.from_config(block)(x, None), _quadratic(x, [1.0, -2.0], 1.7), rtol=1e-5)
  block.reward = 'one_sided'
  np.testing.assert_allclose(rewards.from_config(block)(x, None),
                             -np.where(x[:, 0] < 0, x[:, 0] ** 2, 0.0), rtol=1e-5)
  block.reward, block.classifier_dir = 'classifier', '/nonexistent/classifier'
  from fmjax.steering import classifier
  with pytest.raises(classifier.ClassifierError, match='train_classifier'):
    rewards.from_config(block)
  block.classifier_dir = ''
  with pytest.raises(ValueError, match='classifier_dir'):
    rewards.from_config(block)
  # One list of names for --mode=steer and fine-tuning, and one factory: fine-tuning's reward is
  # the factory's for every name it builds.
  assert configs.STEER_REWARDS == configs.FINETUNE_REWARDS == rewards.NAMES
  from fmjax import from_config
  config = configs.base_config()
  config.loss.name = 'reward_backprop'
  config.finetune.center, config.finetune.std = (0.5, 2.0), 0.8
  for name in ('quadratic', 'one_sided'):
    config.finetune.reward = name
    np.testing.assert_allclose(from_config.finetune_options(config).reward(x, None),
                               rewards.from_config(config.finetune)(x, None), rtol=1e-6)


def test_reward_names_are_validated_the_same_way_for_both():
  for name in rewards.NAMES:
    c = configs.base_config()
    c.steer.reward = name
    c.steer.classifier_dir = '/some/classifier'
    configs.validate_steer(c)
  c = configs.base_config()
  c.steer.reward = 'bright'
  with pytest.raises(configs.ConfigError, match="one_sided"):
    configs.validate_steer(c)
  c = configs.base_config()
  c.finetune.reward = 'classifier'
  need = lambda ok, msg: (_ for _ in ()).throw(configs.ConfigError(msg)) if not ok else None
  with pytest.raises(configs.ConfigError, match='finetune.classifier_dir'):
    configs._validate_finetune(c, need)


def test_sample_num_is_an_alias_of_num_samples():
  c = configs.base_config()
  c.sample.num = 50                      # the old name (saved configs, old commands)
  assert c.sample.num_samples == 50
  c.sample.num_samples = 7
  assert c.sample.num == 7
  assert json.loads(c.to_json_best_effort())['sample'] == {'num': 7, 'num_samples': 7, 'steps': 1}
