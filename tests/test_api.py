"""fmjax.load(...).sample / velocity / flow_map / decode where users call them, on a trained
class-conditional model (3 classes + the null label), with labels, guidance scales != 1, odd
sizes and uneven chunks. Answers are written out independently: the noise rule by hand
(normal(fold_in(key, i))), the k-step flow-map and Heun loops in numpy over direct network calls,
classifier-free guidance as v_null + w (v_label - v_null) (Ho & Salimans 2207.12598, Eq. 6)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_api_fixtures import NUM_CLASSES, noise_by_hand, train_conditional, velocity_by_hand

NULL = NUM_CLASSES          # the null label's id (the extra embedding row)
W = 2.5                     # a guidance scale != 1 (and != 0, 2: no coefficient swap passes)


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  import fmjax
  return fmjax.load(str(train_conditional(tmp_path_factory.mktemp('api_cond'))))


def guided_by_hand(model, s, t, x, labels, w):
  """v_null + w (v_label - v_null) from two direct network calls (the null row = NUM_CLASSES)."""
  v_label = velocity_by_hand(model, s, t, x, labels)
  v_null = velocity_by_hand(model, s, t, x, np.full(len(x), NULL))
  return v_null + w * (v_label - v_null)


def flow_map_loop(model, key, rows, times, labels, w):
  """The k-step flow-map sampler in numpy: x <- x + (t - s) v_{s,t}(x), guided."""
  x = noise_by_hand(key, rows).astype(np.float64)
  for s, t in zip(times[:-1], times[1:]):
    x = x + (t - s) * guided_by_hand(model, s, t, x, labels, w)
  return x


def test_the_network_is_class_conditional(model):
  # Non-degenerate: every label and the null label give a different velocity here.
  assert model.num_classes == NUM_CLASSES
  x = np.random.default_rng(0).normal(size=(4, 2))
  v = [velocity_by_hand(model, 0.3, 0.7, x, np.full(4, y)) for y in range(NUM_CLASSES + 1)]
  for a in range(len(v)):
    for b in range(a):
      assert np.max(np.abs(v[a] - v[b])) > 1e-2


def test_sample_is_the_guided_flow_map_loop_on_noise_by_row(model):
  key = jax.random.PRNGKey(7)
  labels = np.array([0, 2, 1, NULL, 2])
  times = [0.0, 0.3, 0.55, 1.0]                  # non-uniform grid
  got = model.sample(key, 5, times=times, labels=labels, guidance_scale=W)
  assert isinstance(got, np.ndarray) and got.dtype == np.float32 and got.shape == (5, 2)
  np.testing.assert_allclose(got, flow_map_loop(model, key, range(5), times, labels, W), atol=2e-5)
  # Guidance changes the samples (the test would not see a wrong scale otherwise).
  plain = model.sample(key, 5, times=times, labels=labels)
  assert np.max(np.abs(got - plain)) > 1e-2
  # A row's label equal to the null id guides nothing: v_null + w (v_null - v_null) = v_null.
  np.testing.assert_allclose(got[3], model.sample(key, 5, times=times)[3], atol=2e-5)


def test_chunked_sample_with_labels_equals_one_batch(model, capsys):
  key = jax.random.PRNGKey(3)
  labels = np.random.default_rng(1).integers(0, NUM_CLASSES + 1, 11)
  whole = model.sample(key, 11, steps=3, labels=labels, guidance_scale=1.7)
  capsys.readouterr()
  chunked = model.sample(key, 11, steps=3, labels=labels, guidance_scale=1.7, chunk_size=4)
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith('sample: chunk')]
  assert len(lines) == 3 and lines[-1].startswith('sample: chunk 3/3 (rows 8..10 of 11)')
  assert isinstance(whole, np.ndarray) and isinstance(chunked, np.ndarray)
  np.testing.assert_allclose(chunked, whole, atol=1e-6)
  # Each row is its own noise row and its own label, wherever its chunk starts.
  third = np.linspace(0, 1, 4)
  np.testing.assert_allclose(whole, flow_map_loop(model, key, range(11), third, labels, 1.7),
                             atol=2e-5)


def test_steps_and_times_grids(model):
  key = jax.random.PRNGKey(5)
  labels = np.array([1, 0, 2])
  by_steps = model.sample(key, 3, steps=3, labels=labels, guidance_scale=W)
  by_times = model.sample(key, 3, times=[0.0, 1 / 3, 2 / 3, 1.0], labels=labels, guidance_scale=W)
  np.testing.assert_allclose(by_steps, by_times, atol=1e-6)
  # A partial grid starts from the noise at its first time and stops at its last.
  partial = model.sample(key, 3, times=[0.2, 0.6, 0.9], partial=True, labels=labels)
  np.testing.assert_allclose(partial, flow_map_loop(model, key, range(3), [0.2, 0.6, 0.9], labels, 1.0),
                             atol=2e-5)
  for bad, match in (([0.0, 0.5, 0.5, 1.0], 'increase strictly'), ([0.0, 1.2], r'lie in \[0, 1\]'),
                     ([0.2, 1.0], 'partial=True')):
    with pytest.raises(ValueError, match=match):
      model.sample(key, 3, times=bad)
  with pytest.raises(ValueError, match='steps must be an integer'):
    model.sample(key, 3, steps=0)


def test_cfg_in_the_ode_sampler(model):
  # The evaluator's ODE path on a loaded model: Heun on the guided velocity b_t = v_{t,t}.
  from fmjax import samplers
  key = jax.random.PRNGKey(11)
  labels = np.array([2, 0, 1, 1, 0])
  x0 = noise_by_hand(key, range(5))
  sampler = samplers.make_ode_sampler(model.parameterization, 3, 'heun', null_label=model.num_classes)
  got = np.asarray(sampler(model.params, jnp.asarray(x0), jnp.asarray(labels), guidance_scale=W))
  b = lambda t, x: guided_by_hand(model, t, t, x, labels, W)
  x, grid = x0.astype(np.float64), np.linspace(0, 1, 4)
  for s, t in zip(grid[:-1], grid[1:]):
    k1 = b(s, x)
    k2 = b(t, x + (t - s) * k1)
    x = x + 0.5 * (t - s) * (k1 + k2)
  np.testing.assert_allclose(got, x, atol=3e-5)


def test_velocity_and_flow_map_are_the_network(model):
  rng = np.random.default_rng(2)
  x = rng.normal(size=(5, 2)).astype(np.float32)
  labels = np.array([0, 1, 2, NULL, 1])
  # X_{s,t}(x) = x + (t - s) net(s, t, x | y) (the displacement parameterization), scalar times.
  np.testing.assert_allclose(model.flow_map(0.25, 0.8, x, labels),
                             x + 0.55 * velocity_by_hand(model, 0.25, 0.8, x, labels), atol=1e-5)
  # Per-row times, and backwards in time (t < s).
  s, t = rng.uniform(0, 1, 5), rng.uniform(0, 1, 5)
  expected = np.stack([x[i] + (t[i] - s[i]) * velocity_by_hand(model, s[i], t[i], x[i:i + 1], labels[i:i + 1])[0]
                       for i in range(5)])
  np.testing.assert_allclose(model.flow_map(s, t, x, labels), expected, atol=1e-5)
  np.testing.assert_allclose(model.velocity(0.4, x, labels),
                             velocity_by_hand(model, 0.4, 0.4, x, labels), atol=1e-5)
  # No labels = the null label.
  np.testing.assert_allclose(model.velocity(0.4, x), velocity_by_hand(model, 0.4, 0.4, x, np.full(5, NULL)),
                             atol=1e-5)
  for call, match in ((lambda: model.flow_map(-0.1, 0.5, x), r's must lie in \[0, 1\]'),
                      (lambda: model.flow_map(0.0, 1.01, x), r't must lie in \[0, 1\]'),
                      (lambda: model.velocity(np.array([0.1, 0.2, 0.3, 0.4, 1.5]), x), r'\[0, 1\]'),
                      (lambda: model.velocity(0.5, x, labels[:3]), 'shape'),
                      (lambda: model.velocity(0.5, x, labels + 1), r'\[0, 3\]')):
    with pytest.raises(ValueError, match=match):
      call()


def test_guidance_scale_needs_labels_and_a_conditional_model(model):
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match='pass labels'):
    model.sample(key, 4, guidance_scale=2.0)
  unconditional = dataclasses.replace(model, num_classes=0)
  with pytest.raises(ValueError, match='unconditional'):
    unconditional.sample(key, 4, guidance_scale=2.0)
  with pytest.raises(ValueError, match='unconditional'):
    unconditional.sample(key, 4, labels=np.zeros(4, np.int32))
  # Scale 1 is no guidance: accepted everywhere.
  assert unconditional.sample(key, 4, guidance_scale=1.0).shape == (4, 2)


def test_decode_paths_of_a_toy_run(model):
  key = jax.random.PRNGKey(0)
  assert not model.is_latent
  with pytest.raises(ValueError, match='nothing to decode'):
    model.sample(key, 2, decode=True)
  with pytest.raises(ValueError, match='nothing to decode'):
    model.decode(np.zeros((2, 2)))
  np.testing.assert_array_equal(model.sample(key, 3, decode=False), model.sample(key, 3))


def test_decode_paths_of_a_latent_model(model):
  """A latent model (random MLP on [4, 4, 4] latents, a random tiny VAE): sample decodes
  x = D(z / scaling_factor), chunked or not, and decode=False returns the latents."""
  from fmjax import autoencoders, from_config
  vae = autoencoders.init(autoencoders.AutoencoderConfig(
      block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
      mid_block_add_attention=False), jax.random.PRNGKey(1))
  config = model.config.copy_and_resolve_references()
  with config.unlocked():
    config.data.name = 'toy64_latents'
  init, apply = from_config.build_network(config, (4, 4, 4), NUM_CLASSES)
  fm = from_config.build_flow_map(config, apply, from_config.build_interpolant(config))
  latent = dataclasses.replace(model, config=config, params=init(jax.random.PRNGKey(2)),
                               parameterization=fm, example_shape=(4, 4, 4), autoencoder=vae)
  assert latent.is_latent and latent.image_shape == (8, 8, 3)
  key, labels = jax.random.PRNGKey(4), np.array([0, 2, 1])
  z = latent.sample(key, 3, steps=2, labels=labels, guidance_scale=W, decode=False)
  assert z.shape == (3, 4, 4, 4)
  images = latent.sample(key, 3, steps=2, labels=labels, guidance_scale=W)
  assert isinstance(images, np.ndarray) and images.shape == (3, 8, 8, 3)
  np.testing.assert_allclose(images, np.asarray(vae.decode(z / vae.scaling_factor)), atol=1e-4)
  np.testing.assert_allclose(latent.sample(key, 3, steps=2, labels=labels, guidance_scale=W,
                                           chunk_size=2), images, atol=1e-5)
  np.testing.assert_allclose(np.asarray(latent.decode(z)), images, atol=1e-5)
