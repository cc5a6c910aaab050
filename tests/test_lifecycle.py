"""The run lifecycle in process, on one 6-step run: which EMA copy a restore picks and the exact
resume of the warmed-up EMA, --mode=eval/sample reading the run's recorded config, ctrl-C
(SIGINT: save the next update and stop), the console's first line and the damaged-checkpoint
message. The parts that need no run are in test_lifecycle_units.py."""

import io
import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

import fmjax.main
from fmjax import checkpointing, configs, train, trained_runs
from fmjax.data import pipelines


def _config(**train_overrides):
  """A tiny run: 2-D Gaussian (std 1.5), 16-unit MLP, LSD, half the rows on the diagonal,
  two EMA copies (decays 0.9 and 0) with warm-up, seed 3."""
  c = configs.base_config()
  c.seed = 3
  c.data.name = 'gaussian'
  c.data.dim = 2
  c.data.scale = 1.5
  c.loss.name = 'lsd'
  c.loss.diagonal_fraction = 0.5
  c.model.hidden = 16
  c.model.depth = 2
  c.model.time_dim = 8
  c.train.batch_size = 15
  c.train.num_steps = 6
  c.train.log_every = 1000
  c.train.checkpoint_every = 3
  c.train.async_checkpointing = False
  c.optim.warmup_steps = 0
  c.optim.ema_decays = (0.9, 0.0)
  c.optim.ema_warmup = True
  c.eval.at_end = False
  c.eval.num_samples = c.eval.reference_samples = 63
  c.eval.steps, c.eval.ode_nfe = (1,), (1,)
  for key, value in train_overrides.items():
    c.train[key] = value
  return c


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A 6-step run with checkpoints at steps 3 and 6, and its console output."""
  workdir = str(tmp_path_factory.mktemp('run'))
  stream = io.StringIO()
  train.train_and_evaluate(_config(), workdir, stream=stream)
  return workdir, stream.getvalue()


@pytest.fixture
def run_copy(run, tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(run[0], workdir)
  return workdir


# ----------------------------------------------------------------------- the EMA of a run


def test_restored_ema_copies_by_index_and_exact_resume(run, run_copy):
  """Copy 1 (decay 0) is the raw parameters, copy 0 (decay 0.9) is not; resuming the 6-step run
  from its step-3 checkpoint reproduces step 6's parameters and both EMA copies bitwise."""
  workdir, _ = run
  loaded = {i: trained_runs.load_trained(workdir, ema=i) for i in (-1, 0, 1)}
  leaves = {i: jax.tree.leaves(t.params) for i, t in loaded.items()}
  for raw, copy1 in zip(leaves[-1], leaves[1]):
    np.testing.assert_array_equal(raw, copy1)
  assert not all(np.allclose(a, b) for a, b in zip(leaves[-1], leaves[0]))
  assert loaded[0].weights == 'EMA copy 0 (decay 0.9 with warm-up: 0.4 at the last update) of step 6'
  shutil.rmtree(os.path.join(checkpointing.checkpoint_dir(run_copy), '6'))
  train.train_and_evaluate(_config(), run_copy)
  for i in (-1, 0, 1):
    resumed = jax.tree.leaves(trained_runs.load_trained(run_copy, ema=i).params)
    for a, b in zip(leaves[i], resumed):
      np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------- eval / sample modes


def _experiment_defaults():
  """What `--config=experiments/toy_gaussian.py` gives before overrides: not what `run` trained."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('toy_gaussian', os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments', 'toy_gaussian.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_eval_mode_reads_the_recorded_config(run):
  workdir, _ = run
  cli = _experiment_defaults()
  cli.eval.num_samples = 31
  cli.seed = 11
  config = fmjax.main.run_mode_config(configs.resolve(cli), workdir, 'eval',
                                      overrides=['eval.num_samples', 'seed'])
  # Training fields from config.json, not from the experiment's defaults ...
  assert config.loss.diagonal_fraction == 0.5 and config.model.hidden == 16
  assert config.data.scale == 1.5 and tuple(config.optim.ema_decays) == (0.9, 0.0)
  # ... evaluation fields: the ones typed, else the recorded ones.
  assert config.eval.num_samples == 31 and config.seed == 11
  assert tuple(config.eval.steps) == (1,) and config.eval.reference_samples == 63
  assert config.eval.at_end is False
  if 'sample.num' in getattr(configs, 'ALIASES', {}):
    # An old name and its new one are one field: typing the old one sets both.
    cli.sample.num = 9
    config = fmjax.main.run_mode_config(cli, workdir, 'sample', overrides=['sample.num'])
    assert (config.sample.num, config.sample.num_samples) == (9, 9)
  # The typed fields alone count: an experiment that would not resolve by itself (a
  # distillation rule without its teacher) still names a run to evaluate.
  cli.loss.name = 'lmd'
  config = fmjax.main.prepare(cli, workdir, 'eval', overrides=['eval.num_samples'])
  assert config.loss.name == 'lsd' and config.eval.num_samples == 31 and config.seed == 3


@pytest.mark.parametrize('mode', ['eval', 'sample'])
def test_eval_and_sample_run_without_the_training_overrides(run_copy, mode, capsys):
  cli = _experiment_defaults()
  cli.seed = 5                                   # the evaluation's noise may change
  result = fmjax.main.run(cli, run_copy, mode, overrides=['seed'])
  assert result['step'] == 6
  out = capsys.readouterr().out
  assert 'EMA copy 0 (decay 0.9 with warm-up: 0.4 at the last update) of step 6' in out


def test_eval_mode_evaluates_the_restore_step_it_is_given(run_copy, capsys):
  """--config.train.restore_step=3 evaluates the older of the two checkpoints (3 and 6); a
  step that was never saved is named with the saved ones."""
  cli = _experiment_defaults()
  cli.train.restore_step = 4
  with pytest.raises(checkpointing.CheckpointError, match=r'No checkpoint for step 4 .*saved steps: \[3, 6\]'):
    fmjax.main.run(cli, run_copy, 'eval', overrides=['train.restore_step'])
  cli.train.restore_step = 3
  result = fmjax.main.run(cli, run_copy, 'eval', overrides=['train.restore_step'])
  assert result['step'] == 3
  line = next(l for l in capsys.readouterr().out.splitlines() if '--mode=eval with the' in l)
  assert line.startswith('fmjax: --mode=eval with the EMA copy 0 (decay 0.9') and line.endswith(' of step 3.')


def test_a_changed_training_field_is_named(run):
  workdir, _ = run
  cli = _experiment_defaults()
  cli.loss.name, cli.loss.diagonal_fraction = 'lsd', 0.25
  with pytest.raises(configs.ConfigError) as error:
    fmjax.main.run_mode_config(configs.resolve(cli), workdir, 'eval',
                               overrides=['loss.diagonal_fraction', 'eval.num_samples'])
  message = str(error.value)
  assert 'config.loss.diagonal_fraction = 0.25: the run trained with 0.5' in message
  assert 'belong to training' in message and 'eval.num_samples' not in message.split('\n')[1]
  # Repeating the trained value is accepted; so is a whole config equal in its training fields.
  cli.loss.diagonal_fraction = 0.5
  fmjax.main.run_mode_config(configs.resolve(cli), workdir, 'eval', overrides=['loss.diagonal_fraction'])
  same = _config()
  same.eval.num_samples = 17
  assert fmjax.main.run_mode_config(configs.resolve(same), workdir, 'sample').eval.num_samples == 17
  same.optim.learning_rate = 3e-3                # a whole config: every field counts as typed
  with pytest.raises(configs.ConfigError, match='optim.learning_rate = 0.003: the run trained with 0.001'):
    fmjax.main.run_mode_config(configs.resolve(same), workdir, 'sample')


def test_an_old_record_without_newer_fields_still_evaluates(run_copy):
  """config.json of an older version: no steer section, no optim.ema_warmup, no
  eval.guidance_interval. The missing evaluation fields come from the command line's config."""
  path = os.path.join(run_copy, 'config.json')
  record = json.load(open(path))
  del record['steer'], record['optim']['ema_warmup'], record['eval']['guidance_interval']
  json.dump(record, open(path, 'w'))
  cli = _experiment_defaults()
  config = fmjax.main.run_mode_config(configs.resolve(cli), run_copy, 'sample', overrides=[])
  assert config.steer.method == cli.steer.method and tuple(config.eval.guidance_interval) == (0.0, 1.0)
  assert config.optim.ema_warmup is False and config.loss.diagonal_fraction == 0.5


def test_no_record_says_to_train_first(tmp_path):
  with pytest.raises(checkpointing.CheckpointError, match='No checkpoint in .*train first with --mode=train'):
    fmjax.main.run(_config(), str(tmp_path), 'eval', overrides=['eval.num_samples'])
  # fmjax.load (and teachers) say the same, with the command to run.
  with pytest.raises(checkpointing.CheckpointError,
                     match=f'No checkpoint in .*train first with --mode=train .*--workdir={tmp_path}`'):
    trained_runs.load_trained(str(tmp_path))


# ----------------------------------------------------------------------- ctrl-C


def _signal_at(monkeypatch, steps):
  original = pipelines.ToySource.batch

  def batch(self, step):
    if step in steps:
      os.kill(os.getpid(), signal.SIGINT)
    return original(self, step)
  monkeypatch.setattr(pipelines.ToySource, 'batch', batch)


def test_ctrl_c_saves_the_next_update_and_stops(tmp_path, monkeypatch):
  """SIGINT during update 6's batch: update 6 carries the request, read one update late, so
  the run saves step 7 and stops (like SIGTERM), and the SIGINT handler is put back."""
  _signal_at(monkeypatch, {5})
  before = signal.getsignal(signal.SIGINT)
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(_config(num_steps=1000, checkpoint_every=0), workdir)
  assert result == {'preempted_at': 7, 'signal': 'SIGINT'}
  assert os.listdir(checkpointing.checkpoint_dir(workdir)) == ['7']
  assert signal.getsignal(signal.SIGINT) is before
  assert train.EXIT_CODES == {'SIGTERM': 75, 'SIGINT': 130}


# ----------------------------------------------------------------------- what the user sees


def test_the_console_says_it_is_alive_before_the_first_log_step(run):
  _, out = run
  lines = out.splitlines()
  first = next(i for i, line in enumerate(lines) if 'first update done in' in line)
  assert lines[first].startswith('step 1/6: first update done in ')
  assert any(line.startswith('step 0/6: compiling') for line in lines[:first])
  assert first < next(i for i, line in enumerate(lines) if line.startswith('step       6/6'))


def _truncate(pattern):
  def damage(workdir):
    folder = os.path.join(checkpointing.checkpoint_dir(workdir), '6', 'state')
    files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
    for path in [p for p in files if pattern in p]:
      with open(path, 'r+b') as f:
        f.truncate(os.path.getsize(path) // 3)
  return damage


@pytest.mark.parametrize('pattern', [os.path.join('state', 'd', ''), os.path.join('state', 'manifest.ocdbt'),
                                     '_sharding'])
def test_a_damaged_checkpoint_message_is_clean(run_copy, pattern):
  _truncate(pattern)(run_copy)
  with pytest.raises(checkpointing.CheckpointError) as error:
    trained_runs.load_trained(run_copy)
  message = str(error.value)
  folder = os.path.join(checkpointing.checkpoint_dir(run_copy), '6')
  assert message.startswith(f'Checkpoint step 6 ({folder}) is damaged or incomplete: its training state')
  assert '--config.train.restore_step=3' in message and f'Delete {folder}' in message
  for junk in ('TensorStore', 'pybind', 'OUT_OF_RANGE', 'DATA_LOSS', '<bound', 'zarr', 'Error'):
    assert junk not in message, message
  assert '\n' not in message
