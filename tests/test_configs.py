"""The config that trains is the config you named: resolution of rule and network options,
validation before any work, clean messages for the errors a user meets first, and the resume
check on resolved configs. All in-process (no subprocess, no training)."""

import dataclasses
import importlib.util
import json
import os

import jax
import ml_collections
import pytest

from fmjax import checkpointing, configs, flow_maps, from_config, losses, main, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'experiments', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def as_json(config):
  return json.loads(config.to_json_best_effort())


# ----------------------------------------------------------------------------- rule options


def test_rule_defaults_follow_loss_name():
  # The case that failed once: --config.loss.name=meanflow on toy_gmm.py kept the adaptive weight.
  named = experiment('toy_gmm')
  named.loss.name = 'meanflow'
  by_name, by_arg = configs.resolve(named), configs.resolve(experiment('toy_gmm', 'meanflow'))
  assert by_name.loss.weighting == 'none'
  assert as_json(by_name) == as_json(by_arg)
  # MeanFlow's own time distribution (logit-normal(0.4, 1) in fmjax time) is filled in.
  assert by_name.loss.times.to_dict() == {'name': 'logit_normal', 'mean': 0.4, 'std': 1.0, 'eps': 1e-5}
  # An image config keeps the paper's weight for the same rule name.
  cifar = experiment('cifar10_unet')
  cifar.loss.name = 'meanflow'
  resolved = configs.resolve(cifar)
  assert (resolved.loss.weighting, resolved.loss.adaptive_power) == ('adaptive', 0.75)
  # Without an experiment default the rule's own (RULES) default holds.
  plain = configs.base_config()
  plain.loss.name = 'meanflow'
  assert configs.resolve(plain).loss.weighting == 'adaptive'


def test_every_rule_option_is_settable_and_recorded():
  config = experiment('toy_gmm', 'meanflow')
  config.loss.diagonal_fraction = 0.5          # the README's first command: AttributeError before
  config.loss.times.name = 'uniform'           # a nested option, given in part
  resolved = configs.resolve(config)
  assert resolved.loss.diagonal_fraction == 0.5 and resolved.loss.weighting == 'none'
  assert resolved.loss.times.to_dict() == {'name': 'uniform', 'mean': 0.4, 'std': 1.0, 'eps': 1e-5}
  assert (resolved.loss.omega, resolved.loss.kappa, resolved.loss.improved) == (1.0, 0.0, False)
  # Options the rule does not understand stay unset; resolving is idempotent.
  assert resolved.loss.grad_through_jvp is None and resolved.loss.gap_decay is None
  assert as_json(configs.resolve(resolved)) == as_json(resolved)
  # The rule that is built has the options the config records.
  rule = from_config.build_rule(resolved, lambda *a: None, None, 0)
  assert rule.options.diagonal_fraction == 0.5 and rule.options.weighting == 'none'
  assert rule.options.times.name == 'uniform' and rule.options.times.mean == 0.4
  # iMF's fixed option is recorded as in force.
  imf = configs.base_config()
  imf.loss.name = 'imf'
  assert configs.resolve(imf).loss.improved is True


@pytest.mark.parametrize('rule, key, value, message', [
    ('lsd', 'omega', 2.0, "Unknown option(s) ['omega'] for loss 'lsd'; valid: ['adaptive_eps'"),
    ('imf', 'improved', False, "Unknown option(s) ['improved'] for loss 'imf'"),
    ('lsd', 'weighting', 'heavy', "Unknown weighting 'heavy'"),
    ('lsd', 'diagonal_fraction', 1.5, 'diagonal_fraction must be in [0, 1], got 1.5'),
    ('psd', 'space', 'z', "Unknown space 'z'"),
    ('fmm', 'ode_method', 'leapfrog', "Unknown ode_method 'leapfrog'"),
    ('meanflow', 'kappa', 0.5, 'Guidance (omega != 1 or kappa != 0) needs null_label'),
    ('flow_matching', 'diagonal_fraction', 0.5, 'diagonal_fraction must be 1.0'),
])
def test_bad_rule_options_are_named(rule, key, value, message):
  config = configs.base_config()
  config.loss.name = rule
  config.loss[key] = value
  with pytest.raises(configs.ConfigError) as err:
    configs.resolve(config)
  assert str(err.value).startswith('config.loss: ') and message in str(err.value)


def test_bad_time_distribution_and_unknown_loss():
  config = configs.base_config()
  config.loss.times.name = 'beta'
  with pytest.raises(configs.ConfigError, match="Unknown time distribution 'beta'"):
    configs.resolve(config)
  config = configs.base_config()
  config.loss.name = 'meanflw'
  with pytest.raises(configs.ConfigError, match=r"Unknown loss 'meanflw'; choose one of \['ect'"):
    configs.resolve(config)


def test_a_run_config_is_resolved_once(tmp_path):
  """main resolves the run's config; what receives it (train.Setup, from_config) uses it as it
  is, while a changed config and a record resolved as one are resolved again."""
  from fmjax import train   # pylint: disable=import-outside-toplevel
  config = configs.base_config()
  config.loss.name = 'meanflow'
  config.loss_defaults.meanflow = {'weighting': 'none'}
  resolved = main.prepare(config, str(tmp_path), 'train')
  assert configs.resolve(resolved) is resolved
  assert train.Setup(resolved, str(tmp_path)).config is resolved
  # Changed after resolution: resolved again (the network option comes back from its default).
  hidden = resolved.model.hidden
  resolved.model.hidden = None
  again = configs.resolve(resolved)
  assert again is not resolved and again.model.hidden == hidden and again.loss.weighting == 'none'
  # A record resolved for loading (a rule this process does not know) is no run config.
  record = configs.base_config()
  record.loss.name = 'users_own_rule'
  loaded = configs.resolve(record, recorded=True)
  assert configs.resolve(loaded, recorded=True) is loaded
  with pytest.raises(configs.ConfigError, match="Unknown loss 'users_own_rule'"):
    configs.resolve(loaded)


def test_resolve_options_fills_every_default():
  settings = losses.resolve_options('shortcut', {})
  # RULES defaults, fixed options and the builder's signature defaults, all in force.
  assert settings['diagonal_fraction'] == 0.875
  assert (settings['intermediate'], settings['space'], settings['dyadic_levels']) == ('midpoint', 'v', 7)
  assert losses.resolve_options('ect', {'min_gap': 0.01})['gap_halving_steps'] == 25_000
  assert losses.resolve_options('esd', {})['eulerian_gradient'] == 'derivative'
  assert losses.resolve_options('emd', {})['eulerian_gradient'] == 'residual'


@pytest.mark.parametrize('name', sorted(losses.RULES))
def test_resolved_options_are_the_options_make_builds(name):
  teacher = (lambda t, x, labels: x) if losses.RULES[name].teacher == 'required' else None
  settings = losses.resolve_options(name, {'diagonal_fraction': 1.0} if name == 'flow_matching' else {})
  rule = losses.make(name, flow_maps.make('displacement', lambda *a: None), None, teacher=teacher)
  assert dataclasses.asdict(rule.options) == {k: settings[k] for k in dataclasses.asdict(rule.options)}
  assert set(settings) - {'teacher_map'} <= set(losses.option_types())


def test_class_conditional_configs_get_the_guidance_row():
  config = experiment('mnist', 'meanflow')
  resolved = configs.resolve(config)
  assert resolved.loss.null_label == 10 and resolved.loss.label_dropout == 0.1


# ---------------------------------------------------------------------------- network options


def test_every_network_is_name_plus_options():
  config = experiment('toy_gmm')
  config.model.hidden = 16
  resolved = configs.resolve(config)
  assert (resolved.model.hidden, resolved.model.depth, resolved.model.time_dim) == (16, 4, 64)
  assert resolved.model.model_channels is None and resolved.model.patch_size is None
  # The MLP is built through the registry, with exactly the recorded sizes.
  init, _ = from_config.build_network(resolved, (2,), 0)
  params = init(jax.random.PRNGKey(0))
  count = sum(x.size for x in jax.tree.leaves(params))
  assert count == models.param_count('mlp', dim=2, hidden=16, depth=4, time_dim=64)
  # A preset fills its values; explicit options override it.
  unet = configs.base_config()
  unet.model.name = 'unet-tiny'
  unet.model.dropout = 0.1
  resolved = configs.resolve(unet)
  assert (resolved.model.model_channels, resolved.model.channel_mult) == (16, (1, 2))
  assert resolved.model.hidden is None and from_config.uses_dropout(resolved)
  assert not from_config.uses_dropout(configs.resolve(experiment('mnist')))
  # The experiment's per-name defaults: cifar10_unet's U-Net with its dropout.
  assert from_config.uses_dropout(experiment('cifar10_unet'))


def test_bad_network_names_and_options_are_named():
  config = configs.base_config()
  config.model.name = 'resnet'
  with pytest.raises(configs.ConfigError, match=r"config.model: Unknown network 'resnet'; choose a family"):
    configs.resolve(config)
  config = experiment('cifar10_unet')
  config.model.hidden = 64
  with pytest.raises(configs.ConfigError) as err:
    configs.resolve(config)
  assert "Unknown option(s) ['hidden'] for the unet network 'unet'; valid: ['attention'" in str(err.value)
  # Values only the constructor would check are named before any data is read.
  config = experiment('cifar10_unet')
  config.model.attention = 'fast'
  with pytest.raises(configs.ConfigError, match=r"config.model.attention = 'fast'; choose one of \('naive'"):
    configs.resolve(config)


def test_configs_saved_with_model_kwargs_still_load():
  # What config.json held before model options were fields.
  legacy = as_json(configs.base_config())
  legacy['model'] = {'name': 'unet', 'hidden': 256, 'depth': 4, 'time_dim': 64,
                     'time_conditioning': 's_t', 'dtype': 'float32',
                     'kwargs': {'channels': 16, 'channel_mults': [1, 2], 'num_res_blocks': 1}}
  del legacy['model_defaults'], legacy['loss_defaults']
  legacy['loss'] = {'name': 'meanflow', 'weighting': 'none'}
  resolved = configs.resolve(ml_collections.ConfigDict(legacy))
  assert (resolved.model.model_channels, tuple(resolved.model.channel_mult), resolved.model.hidden) == (16, (1, 2), None)
  assert resolved.loss.weighting == 'none' and resolved.loss.times.name == 'logit_normal'


def test_data_dim_follows_the_means():
  config = configs.base_config()
  config.data.means = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
  assert configs.resolve(config).data.dim == 3
  assert configs.resolve(configs.base_config()).data.dim == 2
  config.data.dim = 2
  with pytest.raises(configs.ConfigError, match='D = 3 columns but config.data.dim = 2'):
    configs.resolve(config)


# -------------------------------------------------------------------------------- the CLI


def test_workdir_that_is_a_file_or_not_writable(tmp_path):
  a_file = tmp_path / 'notes.txt'
  a_file.write_text('x')
  with pytest.raises(configs.ConfigError, match='is a file, not a folder'):
    main.check_workdir(str(a_file))
  with pytest.raises(configs.ConfigError, match='cannot be written'):
    main.check_workdir(str(a_file / 'run'))
  with pytest.raises(configs.ConfigError, match='does not exist; --mode=eval reads a trained run'):
    main.check_workdir(str(tmp_path / 'typo'), 'eval')
  assert not os.path.exists(tmp_path / 'typo')
  main.check_workdir(str(tmp_path / 'new' / 'run'))        # created for training
  assert os.path.isdir(tmp_path / 'new' / 'run')


def test_unknown_key_message_keeps_the_suggestion():
  with pytest.raises(AttributeError) as err:
    configs.base_config().loss.diagonal_fractio
  argv = ['fmjax', '--config=experiments/toy_gmm.py', '--config.loss.diagonal_fractio=0.5']
  assert main.unknown_key_message(err.value, argv) == (
      "fmjax: --config.loss.diagonal_fractio: no such config key 'diagonal_fractio'. "
      'Did you mean "diagonal_fraction" instead of "diagonal_fractio"?')


def test_missing_experiment_file(tmp_path):
  with pytest.raises(SystemExit) as err:
    main.parse_flags(['fmjax', f'--config={tmp_path}/nope.py:lsd', f'--workdir={tmp_path}'])
  assert err.value.code == (f"fmjax: --config: no experiment file '{tmp_path}/nope.py'; "
                            'name one such as experiments/toy_gmm.py.')


# ------------------------------------------------------------------------------- resuming


def test_resume_refuses_what_changes_training_and_allows_safe_keys(tmp_path):
  saved = as_json(configs.resolve(experiment('toy_gmm', 'meanflow')))
  # The same run named another way resumes; safe keys may change.
  same = experiment('toy_gmm')
  same.loss.name = 'meanflow'
  same.train.num_steps, same.train.log_every, same.eval.num_samples = 99, 7, 10
  same.sharding.fsdp = 2
  same.data.in_memory_gib, same.data.read_threads = 0.5, 8
  checkpointing.check_compatible(saved, same, str(tmp_path))
  # A checkpoint from before the input pipeline's keys existed resumes and evaluates.
  older = json.loads(json.dumps(saved))
  del older['data']['in_memory_gib'], older['data']['read_threads']
  checkpointing.check_compatible(older, same, str(tmp_path))
  # The case that failed once: another target resumed silently.
  other = experiment('toy_gmm', 'meanflow')
  other.data.scale = 3.0
  other.loss.times.name = 'uniform'
  with pytest.raises(checkpointing.IncompatibleCheckpointError) as err:
    checkpointing.check_compatible(saved, other, str(tmp_path))
  message = str(err.value)
  assert 'data.scale: checkpoint has 1.0, this config has 3.0' in message
  assert 'loss.times.name: checkpoint has "logit_normal", this config has "uniform"' in message
  assert 'num_steps' not in message
  # A rule option that only a default changes counts too: the toy's weighting vs the paper's.
  paper = configs.base_config()
  paper.loss.name = 'meanflow'
  for key in ('data', 'train', 'optim', 'model_defaults'):
    paper[key] = experiment('toy_gmm')[key]
  with pytest.raises(checkpointing.IncompatibleCheckpointError, match='loss.weighting: checkpoint has "none"'):
    checkpointing.check_compatible(saved, paper, str(tmp_path))


def test_resume_compares_a_legacy_checkpoint_config_resolved(tmp_path):
  current = experiment('toy_gmm')
  legacy = as_json(current)
  legacy['model'] = {'name': 'mlp', 'hidden': 256, 'depth': 4, 'time_dim': 64,
                     'time_conditioning': 's_t', 'dtype': 'float32', 'kwargs': {}}
  legacy['loss'] = {'name': 'lsd'}
  checkpointing.check_compatible(legacy, current, str(tmp_path))


@pytest.mark.parametrize('key, value, message', [
    ('flow_map.parameterization', 'residual', "Unknown flow-map parameterization 'residual'"),
    ('model.time_conditioning', 'gap', "config.model.time_conditioning = 'gap'"),
    ('loss.name', 'lmd', "'lmd' distills a teacher: set --config.teacher.workdir"),
    ('teacher.workdir', 'runs/teacher', "'lsd' trains from scratch, but config.teacher.workdir is set"),
])
def test_names_checked_before_any_work(key, value, message):
  config = configs.base_config()
  section, field = key.split('.')
  config[section][field] = value
  with pytest.raises(configs.ConfigError) as err:
    configs.resolve(config)
  assert message in str(err.value)
