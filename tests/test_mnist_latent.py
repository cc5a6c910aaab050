"""The latent MNIST chain of benchmarks/mnist_latent.sh at a tiny size, in one process: autoencoder ->
mnist5k latent dataset -> flow matching -> a map distilled from it (LMD) -> the evaluation with
the digit classifier (and a stand-in feature network) -> the table; `fmjax.load` returns decoded
28 x 28 digits and steers them with the classifier reward."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import fmjax
from fmjax import logging_utils, main as cli, train
from fmjax.autoencoders import train as ae_train
from fmjax.data import latents, mnist5k
from fmjax.evaluation import evaluator, fid
from fmjax.steering import classifier

ROOT = os.path.join(os.path.dirname(__file__), '..')
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import mnist_latent_table  # noqa: E402
sys.path.remove(os.path.join(ROOT, 'benchmarks'))


def _experiment(arg):
  path = os.path.join(ROOT, 'experiments')
  sys.path.insert(0, path)
  try:
    import mnist_latent
  finally:
    sys.path.remove(path)
  return mnist_latent.get_config(arg)


def _features(params, images):   # a cheap stand-in for Inception: a fixed projection of the pixels
  x = jax.numpy.asarray(images, jax.numpy.float32).reshape(images.shape[0], -1) / 255.0
  return x @ params['w']


@pytest.fixture(scope='module')
def chain(tmp_path_factory):
  tmp = tmp_path_factory.mktemp('mnist_latent')
  data_dir = str(tmp / 'tfds')
  mnist5k.build(data_dir)
  vae, info = ae_train.train(ae_train.Options(data_dir=data_dir, size='tiny', max_train_images=256),
                             log=lambda *a: None)
  ae_train.save(str(tmp / 'autoencoder'), vae, info)
  latents.build_latents('tfds:mnist5k', str(tmp / 'autoencoder'), data_dir=data_dir, batch_size=500,
                        log=open(os.devnull, 'w'))
  # An untrained classifier is a judge all the same (what it says is not under test here).
  options = classifier.TrainOptions()
  classifier.save(str(tmp / 'classifier'), classifier.make_model(options), options, {})
  runs = {}
  for rule, extra in (('flow_matching', {}), ('lmd', {'teacher': str(tmp / 'flow_matching')})):
    c = _experiment(f'{rule},tiny')
    c.autoencoder = str(tmp / 'autoencoder')
    c.data.data_dir = data_dir
    c.eval.at_end = False
    c.eval.classifier_dir = str(tmp / 'classifier')
    c.eval.fid_reference = str(tmp / 'reference.npz')
    if extra:
      c.teacher.workdir = extra['teacher']
    cli.run(c, str(tmp / rule), 'train')
    runs[rule] = c
  return {'tmp': tmp, 'data_dir': data_dir, 'vae': vae, 'runs': runs}


def test_the_distilled_map_loads_and_samples_decoded_digits(chain):
  model = fmjax.load(str(chain['tmp'] / 'lmd'))
  assert model.example_shape == tuple(latents.read_info(os.path.join(
      chain['data_dir'], 'mnist5k_latents', '1.0.0'))['latent_shape'])
  x = model.sample(jax.random.PRNGKey(0), 6, steps=1, labels=np.arange(6))
  assert x.shape == (6, 28, 28, 1) and np.all(np.isfinite(x))
  reward = classifier.load_reward(str(chain['tmp'] / 'classifier'), target_class=3)
  out = model.steer(jax.random.PRNGKey(1), 8, reward, method='best_of_n', steps=1, n=4,
                    select='argmax', labels=np.full(8, 3))
  assert out.samples.shape == (8, 28, 28, 1) and out.nfe == 4
  base = model.sample(jax.random.PRNGKey(1), 32, steps=1, labels=np.full(32, 3))
  assert float(np.mean(reward(out.samples))) > float(np.mean(reward(base)))


def test_evaluation_judges_decoded_samples_and_the_table_reads_it(chain):
  config = chain['runs']['lmd']
  w = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (28 * 28 * 3, 8))) / 28
  extractor = fid.FeatureExtractor({'w': w}, batch_size=8, feature_fn=_features)
  images, _ = classifier.load_split(chain['data_dir'], 'test')
  from fmjax.evaluation import sweep
  fid.save_statistics(config.eval.fid_reference, fid.statistics(
      np.asarray(_features({'w': w}, sweep.to_rgb_uint8(images[:64]))), dataset='mnist5k',
      split='test', resize='none', feature_extractor='fake'))
  setup = train.Setup(config, str(chain['tmp'] / 'lmd'))
  evaluate = evaluator.Evaluator(setup.config, setup.workdir, setup.mesh, setup.source,
                                 setup.interpolant, setup.flow_map, feature_fn=extractor,
                                 autoencoder=setup.autoencoder)
  logger = logging_utils.MetricsLogger(setup.workdir, 0, 0, jsonl=False)
  with jax.set_mesh(setup.mesh):
    results = evaluate(setup.init_state(), 0, logger, final=True)
  logger.close()
  assert results['fid_reference']['dataset'] == 'mnist5k'
  for row in results['few_step'].values():
    assert row['num_samples'] == 16 and 0 <= row['confident_share'] <= 1 and 0 <= row['class_tv'] <= 1
    assert np.isfinite(row['fid'])
  eval_dir = chain['tmp'] / 'eval'
  eval_dir.mkdir()
  (eval_dir / 'lmd.json').write_text(json.dumps(results))
  (eval_dir / 'lmd_w1.5.json').write_text(json.dumps(results))   # as from the guided teacher
  text, _ = mnist_latent_table.table(str(eval_dir), 'lmd')
  assert text.count('| lmd (from flow matching) | 1-step map | 1 |') == 1
  assert text.count('| lmd (from flow matching, guidance 1.5) | 1-step map | 1 |') == 1
  assert text.count('| lmd (from flow matching) | ODE euler,') == 3   # 8, 16, 32 NFE


def test_the_sample_grids_draw_every_panel(chain, tmp_path):
  """benchmarks/mnist_latent_grids.py on the tiny chain (its flow map: the distilled run)."""
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  import mnist_latent_grids
  drawn = mnist_latent_grids.panels(str(chain['tmp']), None, per_digit=1, seed=0, flow_map_run='lmd')
  assert [title for title, _ in drawn] == ['LMD, 1 step', 'LMD, 4 steps', 'flow matching, Euler ODE, 32 NFE']
  for _, images in drawn:
    assert images.shape == (10, 28, 28, 1) and np.all(np.isfinite(images))
  mnist_latent_grids.save(str(tmp_path / 'grid.png'), drawn, per_digit=1)
  assert os.path.getsize(tmp_path / 'grid.png') > 0


def test_the_chain_script_is_valid_bash():
  subprocess.run(['bash', '-n', os.path.join(ROOT, 'benchmarks', 'mnist_latent.sh')], check=True)


def test_the_steering_benchmark_runs_on_the_tiny_chain(chain, tmp_path):
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  try:
    import mnist_latent_steer
  finally:
    sys.path.remove(os.path.join(ROOT, 'benchmarks'))
  out = tmp_path / 'steering.json'
  rows = mnist_latent_steer.main(['--run', str(chain['tmp'] / 'lmd'), '--classifier_dir',
                                  str(chain['tmp'] / 'classifier'), '--tiny', '--out', str(out)])
  assert [r['nfe'] for r in rows[:3]] == [1, 1, 2]   # plain, conditional, best-of-2 of 1-step maps
  assert all(r['samples'] == 4 and 0.0 <= r['confident_share'] <= r['argmax_share'] <= 1.0
             for r in rows)
  assert json.loads(out.read_text())['rows'] == json.loads(json.dumps(rows))
  probs = np.array([[0.05, 0.91, 0.04], [0.5, 0.3, 0.2], [0.1, 0.85, 0.05], [0.2, 0.7, 0.1]])
  assert mnist_latent_steer.judge(probs, 1) == (0.25, 0.75)


def test_the_digit_share_check_runs_on_the_tiny_chain(chain):
  sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
  try:
    import mnist_latent_share
  finally:
    sys.path.remove(os.path.join(ROOT, 'benchmarks'))
  rows = mnist_latent_share.main([f"{chain['tmp'] / 'lmd'}::2:1.5", '--classifier_dir',
                                  str(chain['tmp'] / 'classifier'), '--num', '6'])
  assert len(rows) == 1 and rows[0]['steps'] == 2 and rows[0]['guidance'] == 1.5
  assert 0.0 <= rows[0]['confident_share'] <= 1.0
  assert mnist_latent_share.parse_spec('r:300') == ('r', 300, 1, 1.0)
  with pytest.raises(ValueError, match='RUN'):
    mnist_latent_share.parse_spec('r:1:2:3:4')
  # Row i asks for digit i % 10; a row counts when p(its digit) >= 0.9.
  probs = np.array([[0.95, 0.05], [0.5, 0.5], [0.05, 0.95]])
  assert mnist_latent_share.confident_share(probs, np.array([0, 1, 1])) == 2 / 3
