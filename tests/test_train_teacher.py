"""train.Setup(config, workdir, teacher=b): a Python velocity as the teacher of a rule whose
teacher is optional (MeanFlow with a toy target's exact velocity: benchmarks/meanflow_ablation.py),
refused for rules that take none or when config.teacher.workdir names one; and the ablation's
variants resolve to the options they claim; a trained teacher under classifier-free guidance
(config.teacher.guidance_scale)."""

import dataclasses
import importlib.util
import os

import jax
import numpy as np
import pytest

from fmjax import configs, losses, train, trained_runs
from fmjax.data import datasets, pipelines

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


@pytest.fixture(scope='module')
def conditional_run(tmp_path_factory):
  """A 2-update class-conditional run with label dropout: its null label (3) is the unconditional model."""
  workdir = str(tmp_path_factory.mktemp('conditional'))
  config = _labelled('flow_matching')
  config.loss.label_dropout = 0.2
  config.train.num_steps, config.train.checkpoint_every, config.eval.at_end = 2, 2, False
  # The raw parameters after large steps: the output layer starts at zero, and an EMA copy
  # after 2 updates would leave the velocity ~1e-5, too small to see guidance in.
  config.optim.warmup_steps, config.optim.learning_rate, config.optim.ema_decays = 0, 0.05, ()
  config.eval.ema_index = -1
  train.train_and_evaluate(config, workdir)
  return workdir


def _labelled(rule):
  """_config(rule) on 24 labelled 4 x 4 images in memory (3 classes)."""
  rng = np.random.default_rng(0)
  datasets.register_arrays('teacher_test_images', rng.integers(0, 256, (24, 4, 4, 1), dtype=np.uint8),
                           np.arange(24) % 3)
  config = _config(rule)
  config.data.name, config.data.num_classes = 'teacher_test_images', 3
  config.train.batch_size = 8
  return config


def _student(teacher_dir, scale):
  config = _labelled('lmd')
  config.loss.label_dropout = 0.2
  config.teacher.workdir, config.teacher.guidance_scale = teacher_dir, scale
  return config


def test_a_guided_teacher_is_classifier_free_guidance_of_the_run(conditional_run):
  """config.teacher.guidance_scale = w: the teacher is b_null + w (b_c - b_null) per row, and
  rows with the null label get b_null. (train.Setup takes its teacher from load_teacher:
  test_faults.py trains a student on one.)"""
  run = trained_runs.load_trained(conditional_run)
  b = lambda t, x, labels: run.flow_map.velocity(run.params, t, x, labels)
  x = jax.random.normal(jax.random.PRNGKey(3), (8, 4, 4, 1)) * 2.0
  t = np.linspace(0.05, 0.95, 8).astype(np.float32)
  labels = np.array([0, 1, 2, 3, 2, 1, 0, 3])
  null = np.full_like(labels, 3)
  guided = trained_runs.load_teacher(_student(conditional_run, 1.7))
  want = b(t, x, null) + 1.7 * (b(t, x, labels) - b(t, x, null))
  assert np.abs(want).mean() > 0.1
  np.testing.assert_allclose(guided(t, x, labels), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(guided(t, x, labels)[labels == 3], b(t, x, null)[labels == 3], atol=1e-5)
  assert np.abs(b(t, x, labels) - want).max() > 0.05           # guidance changed something
  plain = trained_runs.load_teacher(_student(conditional_run, 1.0))
  np.testing.assert_allclose(plain(t, x, labels), b(t, x, labels), rtol=1e-6, atol=1e-6)


def test_a_guided_teacher_needs_labels_and_label_dropout(conditional_run):
  run = trained_runs.load_trained(conditional_run)
  config = run.config.copy_and_resolve_references()
  config.loss.label_dropout = 0.0
  with pytest.raises(configs.ConfigError, match='label_dropout=0.1 or set --config.teacher.guidance_scale=1'):
    trained_runs._guided_velocity(dataclasses.replace(run, config=config), None, 2.0)
  with pytest.raises(configs.ConfigError, match='trained without labels'):
    trained_runs._guided_velocity(dataclasses.replace(run, num_classes=0), None, 2.0)
  config = _student(conditional_run, 2.0)
  config.data.num_classes, config.loss.label_dropout = 0, 0.0
  with pytest.raises(configs.ConfigError, match='guides a class-conditional teacher'):
    configs.resolve(config)
