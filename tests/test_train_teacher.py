"""train.Setup(config, workdir, teacher=b): a Python velocity as the teacher of a rule whose
teacher is optional (MeanFlow with a toy target's exact velocity: benchmarks/meanflow_ablation.py),
refused for rules that take none or when config.teacher.workdir names one; and the ablation's
variants resolve to the options they claim."""

import importlib.util
import os

import jax
import numpy as np
import pytest

from fmjax import configs, losses, train
from fmjax.data import pipelines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(rule):
  c = configs.base_config()
  c.data.name = 'gmm'
  c.data.means = ((-2.0, 0.5), (2.0, 1.0), (0.5, -2.0))
  c.data.stds = (0.3, 0.5, 0.4)
  c.data.weights = (1.0, 2.0, 1.5)
  c.model.hidden, c.model.depth, c.model.time_dim = 16, 2, 8
  c.loss.name = rule
  c.train.batch_size = 33
  return c


def test_python_teacher_replaces_the_conditional_velocity(tmp_path):
  config = _config('meanflow')
  plain = train.Setup(config, str(tmp_path / 'plain'))
  target = pipelines.make_toy_target(config.data)
  teacher = lambda t, x, labels=None: target.velocity(plain.interpolant, t, x)
  taught = train.Setup(config, str(tmp_path / 'taught'), teacher=teacher)
  state = plain.init_state()
  batch = {'x1': target.sample(jax.random.PRNGKey(1), 33)}
  key = jax.random.PRNGKey(2)
  loss_plain, metrics_plain = jax.jit(plain.rule)(state['params'], batch, key)
  loss_taught, metrics_taught = jax.jit(taught.rule)(state['params'], batch, key)
  # The same network, rows and times: only the regression target differs.
  options = train.from_config.loss_options(taught.config, 0)
  reference = losses.make('meanflow', taught.flow_map, taught.interpolant, teacher=teacher, **options)
  loss_reference, _ = jax.jit(reference)(state['params'], batch, key)
  np.testing.assert_allclose(float(loss_taught), float(loss_reference), rtol=1e-6)
  assert abs(float(loss_taught) - float(loss_plain)) > 1e-3 * abs(float(loss_plain))
  # The diagonal rows regress onto b_t(x_t), whose residual at an untrained net is far smaller
  # than onto the noisy conditional velocity x1 - x0 (variance of the noise and data removed).
  assert float(metrics_taught['loss_diagonal']) < 0.8 * float(metrics_plain['loss_diagonal'])


@pytest.mark.parametrize('rule,workdir', [('lsd', ''), ('meanflow', '/some/run')])
def test_python_teacher_refused_where_it_cannot_apply(tmp_path, rule, workdir):
  config = _config(rule)
  config.teacher.workdir = workdir
  with pytest.raises(ValueError, match='optional teacher'):
    train.Setup(config, str(tmp_path), teacher=lambda t, x, labels=None: x,
                make_source=lambda *a: pytest.fail('data opened before the teacher was checked'))


def test_ablation_variants_resolve_to_their_options():
  spec = importlib.util.spec_from_file_location(
      'meanflow_ablation', os.path.join(ROOT, 'benchmarks', 'meanflow_ablation.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  resolved = {name: configs.resolve(module.make_config(rule, overrides, 5, 3, None)).loss
              for name, (rule, overrides, _) in module.VARIANTS.items()}
  paper = resolved['mf_paper']
  assert (paper.weighting, paper.adaptive_eps, paper.diagonal_fraction, paper.diagonal_time) == (
      'adaptive', 0.01, 0.75, 'pair')
  assert (paper.times.name, paper.times.mean, paper.times.std) == ('logit_normal', 0.4, 1.0)
  assert resolved['mf_unweighted'].weighting == 'none'
  assert resolved['mf_uniform_times'].times.name == 'uniform'
  assert resolved['mf_uniform_times'].weighting == 'adaptive'
  assert resolved['mf_diagonal_0.5'].diagonal_fraction == 0.5
  lsd_like = resolved['mf_lsd_settings']
  assert (lsd_like.weighting, lsd_like.times.name, lsd_like.diagonal_time,
          lsd_like.diagonal_times.name) == ('none', 'uniform', 'diagonal_times', 'uniform')
  assert resolved['imf_paper'].diagonal_fraction == 0.5 and resolved['imf_paper'].weighting == 'adaptive'
  assert resolved['lsd'].times.name == 'uniform'
  config = module.make_config('meanflow', {}, 5, 3, None)
  assert (config.data.dim, config.seed, config.train.num_steps) == (5, 3, 5000)
