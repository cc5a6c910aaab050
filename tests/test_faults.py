"""Faults and bad input in the training system: preemption (SIGTERM at the next update, exit
status 75), runs that go non-finite, damaged or half-deleted checkpoints, restore_step, the
sampling API's argument checks and chunking, quiet loads, metrics.jsonl after a resume."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import fmjax.api
import fmjax.main
from fmjax import checkpointing, configs, logging_utils, train, trained_runs
from fmjax.data import pipelines
from fmjax.evaluation import evaluator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from train_testlib import wait_for_first_checkpoint  # noqa: E402


def _config(**train_overrides):
  c = configs.base_config()
  c.data.name = 'gaussian'
  c.data.dim = 2
  c.loss.name = 'lsd'
  c.model.hidden = 16
  c.model.depth = 2
  c.model.time_dim = 8
  c.train.batch_size = 16
  c.train.num_steps = 4
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.train.async_checkpointing = False
  c.optim.warmup_steps = 0
  c.eval.at_end = False
  for key, value in train_overrides.items():
    c.train[key] = value
  return c


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
  """A 4-step run with checkpoints at steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp('run'))
  train.train_and_evaluate(_config(), workdir)
  assert sorted(int(d) for d in os.listdir(checkpointing.checkpoint_dir(workdir))) == [2, 4]
  return workdir


@pytest.fixture
def run_copy(trained_run, tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(trained_run, workdir)
  return workdir


# ----------------------------------------------------------------------- preemption


def test_sigterm_stops_after_the_next_update_and_saves_it(tmp_path, monkeypatch):
  """With log_every far away, SIGTERM during update 6's batch stops the run after update 7
  (read one update late), with a checkpoint of step 7 and no evaluation started, though step 7
  is an evaluation step (a preempted job has seconds left)."""
  original = pipelines.ToySource.batch

  def batch(self, step):
    if step == 5:
      os.kill(os.getpid(), signal.SIGTERM)
    return original(self, step)

  evaluated = []
  monkeypatch.setattr(pipelines.ToySource, 'batch', batch)
  monkeypatch.setattr(evaluator.Evaluator, '__call__',
                      lambda self, state, step, logger, final: evaluated.append(step) or {})
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(
      _config(num_steps=1000, log_every=500, checkpoint_every=0, eval_every=7), workdir)
  assert result == {'preempted_at': 7, 'signal': 'SIGTERM'}
  assert os.listdir(checkpointing.checkpoint_dir(workdir)) == ['7']
  assert evaluated == []


def test_preempted_cli_run_exits_75_and_resumes(tmp_path):
  """The real thing: SIGTERM to `python -m fmjax.main` mid-run -> exit status 75 within a
  few updates, and the same command resumes from the saved step."""
  workdir = tmp_path / 'run'
  command = [sys.executable, '-m', 'fmjax.main', '--config=experiments/toy_gaussian.py',
             f'--workdir={workdir}', '--config.train.num_steps=100000',
             '--config.train.log_every=50000', '--config.train.checkpoint_every=20',
             '--config.train.batch_size=16', '--config.eval.at_end=False']
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  checkpoints = wait_for_first_checkpoint(process, workdir)
  process.send_signal(signal.SIGTERM)
  sent = time.time()
  out, err = process.communicate(timeout=120)
  assert process.returncode == train.PREEMPTED_EXIT_CODE == 75, err[-3000:]
  assert time.time() - sent < 60
  assert 'SIGTERM: saved checkpoint at step' in out
  saved = max(int(d) for d in os.listdir(checkpoints) if d.isdigit())
  assert 20 <= saved < 100000


# ----------------------------------------------------------------------- non-finite


def test_a_run_that_is_never_finite_stops_at_the_limit(tmp_path, monkeypatch):
  original = pipelines.ToySource.batch
  monkeypatch.setattr(pipelines.ToySource, 'batch',
                      lambda self, step: jax.tree.map(lambda x: x * np.nan, original(self, step)))
  with pytest.raises(train.NonFiniteError, match=r'3 updates in a row.*after update 3'):
    train.train_and_evaluate(_config(num_steps=1000, log_every=500, max_nonfinite_in_a_row=3),
                             str(tmp_path / 'run'))


def test_skipped_updates_are_logged_as_a_count(tmp_path, monkeypatch):
  original = pipelines.ToySource.batch
  bad_steps = {1, 2}
  monkeypatch.setattr(pipelines.ToySource, 'batch', lambda self, step: jax.tree.map(
      lambda x: x * np.nan if step in bad_steps else x, original(self, step)))
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_config(num_steps=5), workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['skipped_updates'] for r in rows] == [0, 1, 2, 2, 2]
  assert 'stop_requested' not in rows[0] and 'nonfinite_run' not in rows[0]


# ----------------------------------------------------------------------- damaged checkpoints


def _largest_file(folder):
  files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
  return max(files, key=os.path.getsize)


def _truncate_state(workdir, step='4'):
  path = _largest_file(os.path.join(checkpointing.checkpoint_dir(workdir), step, 'state'))
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 3)


def _delete_state(workdir):
  shutil.rmtree(os.path.join(checkpointing.checkpoint_dir(workdir), '4', 'state'))


def _garble_config(workdir):
  folder = os.path.join(checkpointing.checkpoint_dir(workdir), '4', 'config')
  for name in os.listdir(folder):
    with open(os.path.join(folder, name), 'w') as f:
      f.write('{"interpolant": "lin')


@pytest.mark.parametrize('damage', [_truncate_state, _delete_state, _garble_config])
def test_a_damaged_checkpoint_is_named_with_what_to_do(run_copy, damage):
  damage(run_copy)
  with pytest.raises(checkpointing.CheckpointError) as error:
    train.train_and_evaluate(_config(num_steps=6), run_copy)
  message = str(error.value)
  assert 'step 4' in message and '--config.train.restore_step=2' in message
  assert os.path.join('checkpoints', '4') in message
  with pytest.raises(checkpointing.CheckpointError, match='step 4'):
    fmjax.api.load(run_copy)
  # Nothing fell back to step 2 on its own, and nothing was deleted.
  assert sorted(os.listdir(checkpointing.checkpoint_dir(run_copy))) == ['2', '4']


def test_restore_step_resumes_from_an_older_step_and_sets_later_ones_aside(run_copy):
  _truncate_state(run_copy)
  train.train_and_evaluate(_config(num_steps=6, restore_step=2), run_copy)
  assert sorted(os.listdir(checkpointing.checkpoint_dir(run_copy))) == ['2', '4', '6']
  assert os.listdir(os.path.join(run_copy, 'checkpoints_set_aside')) == ['4']
  assert fmjax.api.load(run_copy).step == 6
  with pytest.raises(checkpointing.CheckpointError, match=r'No checkpoint for step 3.*\[2, 4, 6\]'):
    train.train_and_evaluate(_config(num_steps=8, restore_step=3), run_copy)


def test_a_damaged_restore_step_moves_nothing_aside(run_copy):
  """restore_step naming a damaged step stops before the later steps are set aside."""
  _truncate_state(run_copy, '2')
  with pytest.raises(checkpointing.CheckpointError, match='step 2.*no older checkpoint'):
    train.train_and_evaluate(_config(num_steps=6, restore_step=2), run_copy)
  assert sorted(os.listdir(checkpointing.checkpoint_dir(run_copy))) == ['2', '4']
  assert not os.path.exists(os.path.join(run_copy, 'checkpoints_set_aside'))


def test_a_state_of_another_structure_is_named(trained_run):
  manager = checkpointing.make_manager(trained_run, read_only=True)
  abstract = checkpointing._replicated_abstract(manager, 4)
  abstract['params']['extra'] = jax.ShapeDtypeStruct((3,), np.float32)
  with pytest.raises(checkpointing.CheckpointError, match='step 4.*training state'):
    checkpointing.restore(manager, trained_run, 4, abstract)
  manager.close()


# ----------------------------------------------------------------------- teachers


def test_a_teacher_is_the_loaded_run_and_its_damage_is_named(run_copy, tmp_path):
  """A distillation teacher comes through the one restore path: its velocity is fmjax.load's,
  and a damaged teacher checkpoint is named as the teacher's."""
  config = _config()
  config.loss.name, config.teacher.workdir, config.teacher.step = 'lmd', run_copy, 2
  teacher = trained_runs.load_teacher(config)
  model = fmjax.api.load(run_copy, step=2)
  x = model.noise(jax.random.PRNGKey(1), 8)
  t = np.linspace(0.1, 0.9, 8).astype(np.float32)
  np.testing.assert_allclose(teacher(t, x), model.velocity(t, x), rtol=1e-6, atol=1e-6)
  assert not np.allclose(teacher(t, x), fmjax.api.load(run_copy).velocity(t, x))   # not step 4
  result = train.train_and_evaluate(config, str(tmp_path / 'student'))
  assert result == {'step': 4}
  _truncate_state(run_copy)
  config.teacher.step = -1   # the latest, step 4: damaged, named, no fallback to step 2
  with pytest.raises(checkpointing.CheckpointError,
                     match=r'teacher \(config.teacher.workdir=.*step 4 .*damaged.*'
                           r'--config.teacher.step=2 '):
    trained_runs.load_teacher(config)


# ----------------------------------------------------------------------- sampling API


def test_sample_rejects_bad_counts_and_grids(trained_run):
  model = fmjax.api.load(trained_run)
  key = jax.random.PRNGKey(0)
  for bad in (-1, 0, 2.5, True, '8'):
    with pytest.raises(ValueError, match='num must be an integer'):
      model.sample(key, bad)
    with pytest.raises(ValueError, match='steps must be an integer'):
      model.sample(key, 4, steps=bad)
  with pytest.raises(ValueError, match='increase strictly'):
    model.sample(key, 4, times=[0.0, 0.6, 0.3, 1.0])
  with pytest.raises(ValueError, match='from 0 .noise. to 1 .data.*partial=True'):
    model.sample(key, 4, times=[0.2, 1.0])
  with pytest.raises(ValueError, match=r'in \[0, 1\]'):
    model.sample(key, 4, times=[0.0, 1.5], partial=True)
  x = model.sample(key, 4, times=[0.2, 0.7], partial=True)   # allowed when asked for
  np.testing.assert_allclose(x, model.flow_map(0.2, 0.7, model.noise(key, 4)), rtol=1e-5, atol=1e-6)


def test_chunked_sampling_equals_one_batch(trained_run):
  model = fmjax.api.load(trained_run)
  key = jax.random.PRNGKey(7)
  whole = np.asarray(model.sample(key, 50, steps=2))
  chunked = model.sample(key, 50, steps=2, chunk_size=16)    # 16 + 16 + 16 + 2 (padded)
  assert isinstance(chunked, np.ndarray) and chunked.shape == (50, 2)
  np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)
  assert not np.allclose(whole[:16], whole[16:32])           # chunks draw different noise


# ----------------------------------------------------------------------- quiet, once


def test_loading_prints_no_orbax_warning(trained_run, caplog):
  with caplog.at_level(logging.WARNING):
    fmjax.api.load(trained_run)
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


@pytest.mark.parametrize('mode', ['eval', 'sample'])
def test_eval_and_sample_modes_print_no_warning(run_copy, mode, caplog):
  config = _config()
  config.eval.num_samples = config.eval.reference_samples = 64
  config.eval.steps, config.eval.ode_nfe = (1,), (1,)
  with caplog.at_level(logging.WARNING):
    result = fmjax.main.run(config, run_copy, mode)
  assert result['step'] == 4
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_metrics_jsonl_holds_each_step_once_after_a_resume(run_copy):
  # A run killed after logging step 5 but before checkpointing it resumes from step 4.
  with open(os.path.join(run_copy, 'metrics.jsonl'), 'a') as f:
    f.write(json.dumps({'step': 5, 'loss': 1.0}) + '\n')
  train.train_and_evaluate(_config(num_steps=6), run_copy)
  steps = [json.loads(line)['step'] for line in open(os.path.join(run_copy, 'metrics.jsonl'))]
  assert steps == [1, 2, 3, 4, 5, 6]


def test_drop_steps_after(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  with open(path, 'w') as f:
    f.writelines(json.dumps({'step': s}) + '\n' for s in (1, 2, 3, 2, 3))
  assert logging_utils.drop_steps_after(path, 2) == 2
  assert [json.loads(line)['step'] for line in open(path)] == [1, 2, 2]
  assert logging_utils.drop_steps_after(str(tmp_path / 'missing.jsonl'), 2) == 0
