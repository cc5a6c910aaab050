"""A user's own training rule, registered from an experiment file (losses.register): its options
are config fields (settable from the command line), it trains through the ordinary loop, and the
run loads and samples in a process where the rule was never registered."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fmjax import losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXPERIMENT = textwrap.dedent('''
    """A user's experiment: LSD with its loss scaled by an option of the user's rule."""
    from fmjax import configs, losses
    from fmjax.losses import lagrangian

    def scaled_lsd(ctx, scale: float = 1.0, grad_through_jvp: bool = True):
      rule = lagrangian.lagrangian_rule(ctx, grad_through_jvp=grad_through_jvp)
      def loss(params, batch, key):
        value, metrics = rule(params, batch, key)
        return scale * value, metrics
      return loss

    if not losses.is_registered('scaled_lsd'):
      losses.register('scaled_lsd', scaled_lsd, defaults={'diagonal_fraction': 0.5})

    def get_config():
      c = configs.base_config()
      c.loss.name = 'scaled_lsd'
      c.data.name = 'gmm'
      c.data.means = ((-2.0, 0.5), (2.0, 1.0))
      c.model.hidden, c.model.depth, c.model.time_dim = 16, 2, 8
      c.train.num_steps = 3
      c.train.batch_size = 32
      c.train.log_every = 1
      c.eval.at_end = False
      return c
''')


def _python(*args, timeout=240):
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                        env=env, cwd=ROOT)


def test_user_rule_trains_from_the_command_line_and_loads_without_it(tmp_path):
  experiment = tmp_path / 'my_experiment.py'
  experiment.write_text(EXPERIMENT)
  workdir = tmp_path / 'run'
  result = _python('-m', 'fmjax.main', f'--config={experiment}', f'--workdir={workdir}',
                   '--config.loss.scale=2.5')
  assert result.returncode == 0, result.stderr[-3000:]
  recorded = json.loads((workdir / 'config.json').read_text())['loss']
  # The user's option came from the command line, the rule's default over the common one.
  assert (recorded['name'], recorded['scale'], recorded['diagonal_fraction']) == ('scaled_lsd', 2.5, 0.5)
  # A fresh interpreter that never imports the experiment file: load and sample.
  script = textwrap.dedent(f'''
      import jax, fmjax
      from fmjax import losses
      assert not losses.is_registered('scaled_lsd')
      model = fmjax.load({str(workdir)!r})
      x = model.sample(jax.random.PRNGKey(0), 5, steps=2)
      print('SHAPE', x.shape, bool(abs(x).max() < 1e3))
  ''')
  loaded = _python('-c', script)
  assert loaded.returncode == 0, loaded.stderr[-3000:]
  assert 'SHAPE (5, 2) True' in loaded.stdout


def _builder(ctx, scale: float = 1.0):
  del ctx, scale
  return lambda params, batch, key: (0.0, {})


def test_register_checks_its_input(monkeypatch):
  monkeypatch.setattr(losses, 'RULES', dict(losses.RULES))
  with pytest.raises(ValueError, match='already registered'):
    losses.register('lsd', _builder)
  with pytest.raises(ValueError, match='teacher must be one of'):
    losses.register('mine', _builder, teacher='sometimes')
  with pytest.raises(ValueError, match='first parameter'):
    losses.register('mine', lambda scale=1.0: None)
  with pytest.raises(ValueError, match='diagonal_fraction'):   # a wrong default fails at once
    losses.register('mine', _builder, defaults={'diagonal_fraction': 1.5})
  assert not losses.is_registered('mine')
  losses.register('mine', _builder, defaults={'diagonal_fraction': 0.25})
  assert losses.resolve_options('mine', {'scale': 3.0})['scale'] == 3.0
  assert losses.resolve_options('mine', {})['diagonal_fraction'] == 0.25
  assert losses.option_types()['scale'] is float
  np.testing.assert_equal(losses.valid_options('mine').count('scale'), 1)
