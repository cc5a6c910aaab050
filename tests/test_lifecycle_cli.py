"""The run lifecycle through `python -m fmjax.main`, as a new user meets it: the README's train
then eval / sample / steer commands without repeating the training overrides, ctrl-C (a real
SIGINT: save, exit 130, resume), and an experiment file whose get_config raises."""

import json
import os
import re
import signal
import subprocess
import sys
import time


from train_testlib import ROOT, env_with_devices, wait_for_first_checkpoint

TINY = ['--config.train.num_steps=4', '--config.train.batch_size=31', '--config.train.log_every=2',
        '--config.train.checkpoint_every=4', '--config.model.hidden=16', '--config.model.depth=2',
        '--config.model.time_dim=8', '--config.eval.num_samples=65', '--config.eval.reference_samples=65',
        '--config.eval.steps=(1,)', '--config.eval.ode_nfe=(1,)', '--config.eval.at_end=False',
        '--config.optim.ema_decays=(0.9,)']


def _main(*args, timeout=300):
  return subprocess.run([sys.executable, '-m', 'fmjax.main', *map(str, args)], cwd=ROOT,
                        env=env_with_devices(1), capture_output=True, text=True, timeout=timeout)


def test_readme_train_then_eval_sample_steer_without_the_overrides(tmp_path):
  """Training with --config.loss.diagonal_fraction=0.5, then --mode=eval and --mode=steer with
  the bare experiment: they use the recorded run (and say which weights); a changed training
  field is one message that names it."""
  workdir = tmp_path / 'gmm_mf'
  experiment = '--config=experiments/toy_gmm.py:meanflow'
  result = _main(experiment, f'--workdir={workdir}', *TINY, '--config.loss.diagonal_fraction=0.5')
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads((workdir / 'config.json').read_text())['loss']['diagonal_fraction'] == 0.5
  weights = 'EMA copy 0 (decay 0.9, no warm-up) of step 4'

  result = _main(experiment, f'--workdir={workdir}', '--mode=eval')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'--mode=eval with the {weights}.' in result.stdout
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert set(final['few_step']) == {'1'}                        # the recorded eval.steps

  # --mode=sample takes the same path in process (test_lifecycle.py), without a fifth start-up.
  result = _main(experiment, f'--workdir={workdir}', '--mode=steer', '--config.steer.num_samples=16',
                 '--config.steer.steps=2')
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'--mode=steer with the {weights}.' in result.stdout

  result = _main(experiment, f'--workdir={workdir}', '--mode=eval', '--config.loss.diagonal_fraction=0.25',
                 '--config.eval.num_samples=33')
  assert result.returncode == 1
  assert 'config.loss.diagonal_fraction = 0.25: the run trained with 0.5' in result.stderr
  assert 'belong to training' in result.stderr and 'Traceback' not in result.stderr


def test_ctrl_c_saves_exits_130_and_the_same_command_resumes(tmp_path):
  workdir = tmp_path / 'run'
  command = [sys.executable, '-m', 'fmjax.main', '--config=experiments/toy_gaussian.py',
             f'--workdir={workdir}', '--config.train.log_every=50000', '--config.train.checkpoint_every=20',
             '--config.train.batch_size=16', '--config.eval.at_end=False']
  process = subprocess.Popen(command + ['--config.train.num_steps=100000'], cwd=ROOT,
                             env=env_with_devices(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  checkpoints = wait_for_first_checkpoint(process, workdir)
  process.send_signal(signal.SIGINT)
  sent = time.time()
  out, err = process.communicate(timeout=120)
  assert process.returncode == 130, err[-3000:]
  assert time.time() - sent < 60
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err
  assert 'ctrl-C: saving at the next update' in err
  saved = max(int(d) for d in os.listdir(checkpoints) if d.isdigit())
  assert f'SIGINT: saved checkpoint at step {saved}; exiting with status 130' in out
  assert 20 <= saved < 100000
  # The first console line came right after the first update, long before log_every.
  assert re.search(r'^step 1/100000: first update done in [0-9.]+ s', out, re.MULTILINE)

  result = subprocess.run(command + [f'--config.train.num_steps={saved + 3}'], cwd=ROOT,
                          env=env_with_devices(1), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'resumed at step {saved}' in result.stdout
  assert max(int(d) for d in os.listdir(checkpoints) if d.isdigit()) == saved + 3


def test_an_error_in_get_config_is_one_line(tmp_path):
  experiment = tmp_path / 'broken.py'
  experiment.write_text('from fmjax import configs\n\n\ndef get_config(arg=None):\n'
                        '  c = configs.base_config()\n  c.train.num_steps = int(arg)\n  return c\n')
  result = _main(f'--config={experiment}:many', f'--workdir={tmp_path / "w"}', timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip() == (
      f'fmjax: --config={experiment}:many: the experiment file raised an error ({experiment} line 6): '
      "ValueError: invalid literal for int() with base 10: 'many'")
  assert not os.path.exists(tmp_path / 'w')
