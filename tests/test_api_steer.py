"""Model.steer where users call it, on a trained class-conditional model with labels per row,
temperature != 1 and odd sizes: a chunked call returns the rows of one big call (guidance,
best-of-N, SMC chunked by whole groups, each group's resampling unchanged), best-of-N's picks are
its own N candidates (written out from the noise rule by hand) chosen by the reward, and the
option names (num_particles, its old name n)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_api_fixtures import NUM_CLASSES, train_conditional

LAMBDA = 0.7     # a temperature != 1


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  import fmjax
  return fmjax.load(str(train_conditional(tmp_path_factory.mktemp('api_steer'))))


def reward(x, labels=None):
  """A quadratic reward centred off the modes, std 1.5 (labels ignored)."""
  del labels
  return -0.5 * jnp.sum((x - jnp.array([4.0, 1.0])) ** 2, axis=-1) / 1.5**2


def _labels(num):
  return np.random.default_rng(num).integers(0, NUM_CLASSES + 1, num).astype(np.int32)


def _same(a, b):
  np.testing.assert_allclose(a.samples, b.samples, atol=1e-5)
  assert (a.log_weights is None) == (b.log_weights is None) and a.nfe == b.nfe
  if a.log_weights is not None:
    np.testing.assert_allclose(a.log_weights, b.log_weights, atol=1e-5)
  assert (a.ess is None) == (b.ess is None)
  if a.ess is not None:
    assert a.ess.shape == b.ess.shape
    np.testing.assert_allclose(a.ess, b.ess, atol=1e-5)


def test_guidance_chunked_equals_one_batch(model, capsys):
  key, labels = jax.random.PRNGKey(1), _labels(9)
  options = dict(temperature=LAMBDA, steps=3, labels=labels, lookahead='denoiser')
  whole = model.steer(key, 9, reward, method='guidance', **options)
  capsys.readouterr()
  chunked = model.steer(key, 9, reward, method='guidance', chunk_size=4, **options)
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith('steer (guidance): chunk')]
  assert len(lines) == 3
  assert isinstance(whole.samples, np.ndarray) and whole.samples.shape == (9, 2)
  _same(whole, chunked)
  # Without steering, guidance is the plain flow-map sampler on the same noise rows and labels.
  plain = model.steer(key, 9, reward, method='guidance', guidance_scale=0.0, chunk_size=4,
                      **{k: v for k, v in options.items() if k != 'lookahead'})
  np.testing.assert_allclose(plain.samples, model.sample(jax.random.split(key)[0], 9, steps=3,
                                                         labels=labels), atol=1e-5)
  assert float(np.mean(reward(whole.samples))) > float(np.mean(reward(plain.samples)))


@pytest.mark.parametrize('select', ['argmax', 'importance'])
def test_best_of_n_picks_its_own_candidates_chunked_or_not(model, select):
  key, labels, n, num = jax.random.PRNGKey(2), _labels(7), 3, 7
  whole = model.steer(key, num, reward, method='best_of_n', temperature=LAMBDA, steps=2,
                      num_particles=n, select=select, labels=labels)
  chunked = model.steer(key, num, reward, method='best_of_n', temperature=LAMBDA, steps=2,
                        num_particles=n, select=select, labels=labels, chunk_size=3)
  _same(whole, chunked)
  assert whole.nfe == n * 2
  # Row i's candidates: noise rows i n .. i n + n - 1 of split(key)[0], with row i's label.
  candidates = model.sample(jax.random.split(key)[0], num * n, steps=2,
                            labels=np.repeat(labels, n)).reshape(num, n, 2)
  r = np.asarray(reward(candidates.reshape(-1, 2))).reshape(num, n)
  distance = np.abs(candidates - whole.samples[:, None]).max(-1)
  assert np.all(distance.min(1) < 1e-5)            # every output is one of its own candidates
  if select == 'argmax':
    np.testing.assert_array_equal(distance.argmin(1), r.argmax(1))
  # ess: the mean over rows of the candidates' ESS fraction, 1 / (n sum_j w_j^2).
  w = np.exp(r / LAMBDA - r.max(1, keepdims=True) / LAMBDA)
  w /= w.sum(1, keepdims=True)
  np.testing.assert_allclose(whole.ess, [np.mean(1 / (w**2).sum(1)) / n], rtol=1e-4)


def test_smc_chunks_by_whole_groups_with_each_groups_resampling_unchanged(model, capsys):
  key, labels, particles, num = jax.random.PRNGKey(3), _labels(15), 3, 15   # 5 groups
  options = dict(temperature=LAMBDA, steps=2, num_particles=particles, labels=labels,
                 ess_threshold=0.9)
  whole = model.steer(key, num, reward, method='smc', **options)
  capsys.readouterr()
  # chunk_size 7 rounds down to 2 whole groups (6 rows): chunks of 2, 2, 1 groups.
  chunked = model.steer(key, num, reward, method='smc', chunk_size=7, **options)
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith('steer (smc): chunk')]
  assert len(lines) == 3 and '(rows 12..14 of 15)' in lines[-1]
  _same(whole, chunked)
  assert whole.ess.shape == (3,)
  # The final resampling stays within each group: every sample is one of its group's particles
  # before resampling (final_resample=False gives them, with their weights).
  unresampled = model.steer(key, num, reward, method='smc', final_resample=False, **options)
  for g in range(num // particles):
    rows = slice(g * particles, (g + 1) * particles)
    d = np.abs(whole.samples[rows][:, None] - unresampled.samples[rows][None]).max(-1)
    assert np.all(d.min(1) < 1e-5)
    np.testing.assert_allclose(np.exp(unresampled.log_weights[rows]).sum(), 1.0, rtol=1e-5)
  # A group's result depends on its index, not on the chunk it ran in: the first 2 groups alone.
  head = model.steer(key, 6, reward, method='smc', temperature=LAMBDA, steps=2,
                     num_particles=particles, labels=labels[:6], ess_threshold=0.9)
  np.testing.assert_allclose(head.samples, whole.samples[:6], atol=1e-5)


def test_option_names(model):
  key, labels = jax.random.PRNGKey(4), _labels(5)
  new = model.steer(key, 5, reward, method='best_of_n', steps=1, num_particles=2, labels=labels)
  old = model.steer(key, 5, reward, method='best_of_n', steps=1, n=2, labels=labels)   # the old name
  _same(new, old)
  with pytest.raises(ValueError, match='once'):
    model.steer(key, 5, reward, method='best_of_n', n=2, num_particles=2)
  with pytest.raises(ValueError, match='takes no option'):
    model.steer(key, 5, reward, method='guidance', num_particles=4)
  with pytest.raises(ValueError, match='multiple of num_particles'):
    model.steer(key, 10, reward, method='smc', num_particles=4)
  with pytest.raises(ValueError, match='shape'):
    model.steer(key, 5, reward, method='guidance', labels=labels[:4])
  with pytest.raises(ValueError, match=r'\[0, 3\]'):
    model.steer(key, 5, reward, method='guidance', labels=labels + 4)


# What the steering maths counts inside jit reaches the caller of Model.steer: NaN / +inf rewards
# are one clear error, -inf is a hard constraint, SMC returns the labels of the rows it moved.

def _nan_for_positive_x0(x, labels=None):
  return jnp.where(x[:, 0] > 0, jnp.nan, -jnp.sum(x ** 2, axis=-1))


def _forbid_negative_x0(x, labels=None):
  return jnp.where(x[:, 0] < 0, -jnp.inf, -0.5 * jnp.sum((x - 1.0) ** 2, axis=-1))


@pytest.mark.parametrize('method,options', [('guidance', {}), ('best_of_n', {'num_particles': 4}),
                                            ('smc', {'num_particles': 4})])
def test_nan_rewards_are_one_clear_error(model, method, options):
  with pytest.raises(ValueError, match=rf'{method}: the reward .* NaN or \+inf for \d+ of \d+ rows'):
    model.steer(jax.random.PRNGKey(3), 12, _nan_for_positive_x0, method=method, temperature=0.37,
                steps=2, chunk_size=8, labels=_labels(12), **options)


@pytest.mark.parametrize('method', ['best_of_n', 'smc'])
def test_minus_inf_is_a_hard_constraint_across_chunks(model, method):
  out = model.steer(jax.random.PRNGKey(4), 24, _forbid_negative_x0, method=method,
                    temperature=2.5, steps=2, num_particles=8, chunk_size=8, labels=_labels(24))
  assert np.all(np.asarray(out.samples)[:, 0] >= 0)


def test_a_group_with_nothing_allowed_is_an_error(model):
  never = lambda x, labels=None: jnp.full((x.shape[0],), -jnp.inf)
  with pytest.raises(ValueError, match=r'smc: 3 of 3 groups have no sample with a finite reward'):
    model.steer(jax.random.PRNGKey(5), 12, never, method='smc', temperature=0.37, steps=2,
                num_particles=4, chunk_size=4, labels=_labels(12))


def test_smc_returns_each_rows_ancestor_label(model):
  """Mixed labels inside each group and a reward that all but forbids labels other than 2
  (weight exp(-50 / 0.37)): resampling moves rows, and every returned label is 2 (each row
  carries its ancestor's label)."""
  labels = np.tile(np.array([0, 1, 2, 2], np.int32), 3)
  favour = lambda x, y: jnp.where(y == 2, 0.0, -50.0) - 0.01 * jnp.sum(x ** 2, axis=-1)
  out = model.steer(jax.random.PRNGKey(6), 12, favour, method='smc', temperature=0.37, steps=2,
                    num_particles=4, chunk_size=8, labels=labels)
  assert out.labels is not None and out.labels.shape == (12,)
  np.testing.assert_array_equal(out.labels, 2)


def test_a_new_method_is_an_options_class_a_runner_and_one_registry_line(model, monkeypatch):
  """The extension point: plain k-step sampling as a method. Model.steer and config.steer's
  validation find it in the registry; its rows follow steer's noise stream (noise row i of
  split(key)[0]), so it equals Model.sample with that key, chunked or not."""
  import dataclasses
  from fmjax import configs
  from fmjax.steering import methods

  @dataclasses.dataclass(frozen=True)
  class PlainOptions(methods.SteeringOptions):
    """No options beyond the temperature (which plain sampling ignores)."""

  def run_plain(pieces, key_noise, key_run, first, chunk, labels, *, reward, steps, options):
    del key_run, reward, options
    x = pieces.sample(pieces.noise(key_noise, chunk, first), steps, labels)
    return methods.Steered(x, None, None, None, jnp.zeros((chunk, 4), jnp.int32), steps)

  monkeypatch.setitem(methods.METHODS, 'plain', methods.MethodSpec(PlainOptions, run_plain))
  key, labels = jax.random.PRNGKey(3), _labels(7)
  out = model.steer(key, 7, reward, method='plain', steps=2, labels=labels, chunk_size=3)
  expected = model.sample(jax.random.split(key)[0], 7, steps=2, labels=labels)
  np.testing.assert_allclose(out.samples, expected, atol=1e-5)
  assert out.nfe == 2 and out.log_weights is None
  config = configs.base_config()
  config.steer.method = 'plain'
  configs.validate_steer(config)
  config.steer.method = 'plane'
  with pytest.raises(configs.ConfigError, match=r"method = 'plane'; choose one of \('best_of_n', 'guidance', 'smc', 'plain'\)"):
    configs.validate_steer(config)
