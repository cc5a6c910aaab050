"""The evaluation of a training run: the few-step sweep at eval time, built once per run.

  evaluator = Evaluator(config, workdir, mesh, source, interpolant, flow_map)
  evaluator.check_ready()                       # before training: FID inputs present?
  results = evaluator(state, step, logger, final=True)

Each call scores the parameters `train_state.select_params(state, config.eval.ema_index)` by
the sweep (`sweep_samplers` -> `sweep` -> `report`): the flow map at k = config.eval.steps against the
ODE on its own velocity at config.eval.ode_nfe, by FID (image sets) or by distances to the
target and errors against the exact map (toy targets); then prints the table and writes the
JSON, the plots, the sample pictures and TensorBoard scalars (process 0). The jitted samplers
and the Inception feature extractor are built at the first call and kept, so later
evaluations of the run compile nothing.

Latent runs (config.data.name a latent dataset): every sampler is followed by the run's
autoencoder's decoder, x = D(z / scaling_factor), inside the same jitted, batch-sharded call,
so FID, precision/recall and the pictures see images; the statistics' provenance records the
autoencoder's digest and the dataset's crop, and `fid.fid` refuses references of another.

Reward fine-tuning runs (loss.name 'reward_distill' or 'reward_backprop', `fmjax.steering.finetune`)
on toy targets are scored against the tilted law q ∝ p exp(r / lambda) they are trained toward,
not against the data p (`evaluation_target`): in closed form for the quadratic reward on a
Gaussian or Gaussian mixture (`fmjax.steering.tilted`, with the exact map of q for the RMSE
columns), by exact rejection sampling otherwise; the results say which (`results['target']`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import configs
from fmjax import logging_utils
from fmjax import plotting
from fmjax import sharding
from fmjax import train_state
from fmjax.evaluation import assets
from fmjax.evaluation import fid
from fmjax.evaluation import inception
from fmjax.evaluation import sweep_samplers
from fmjax.evaluation import reference_batches
from fmjax.evaluation import sample_batches
from fmjax.evaluation import report
from fmjax.evaluation import resize
from fmjax.evaluation import sweep

_NOISE_SALT = 0xE7A1   # the sweep's noise: fold_in(PRNGKey(config.seed), _NOISE_SALT)


class Evaluator:
  """Evaluates training states of one run (see the module docstring).

  feature_fn: image sets only, replaces the Inception feature extractor (tests).
  autoencoder: latent runs, the run's `fmjax.autoencoders.Autoencoder` (`from_config.load_autoencoder`)
    whose decoder turns samples into images.
  """

  def __init__(self, config, workdir: str, mesh, source, interpolant, flow_map, *,
               feature_fn: Callable | None = None, autoencoder=None):
    self.config, self.workdir, self.mesh = config, workdir, mesh
    self.source, self.interpolant, self.flow_map = source, interpolant, flow_map
    self.toy = config.data.name in configs.TOY_DATASETS
    # What the toy sweep scores against: the data, or the tilted law of a reward fine-tuning run.
    self.target, self.target_note = (evaluation_target(config, source.target) if self.toy
                                     else (None, None))
    self.latent = configs.is_latent_dataset(config.data.name)
    self.autoencoder = autoencoder
    self._feature_fn = feature_fn
    self._sample_fns = None
    self._reference = None
    self._classifier = None
    self._class_probs()   # loaded now, outside any mesh context; a bad folder fails before training

  def check_ready(self) -> None:
    """Raises `assets.MissingFIDAssetsError` now (before training) when FID inputs, or the
    decoder a latent run's evaluation needs, are missing."""
    if self.latent and self.autoencoder is None:
      raise assets.MissingFIDAssetsError(
          f'config.data.name = {self.config.data.name!r} holds autoencoder latents: evaluation '
          'decodes the samples, so set --config.autoencoder=FOLDER (the VAE that built the '
          'dataset, diffusers layout), or skip evaluation with --config.eval.at_end=False.')
    assets.check_fid_ready(self.config)

  @property
  def sample_fns(self) -> dict:
    """{SamplerSpec: jitted sample(params, x0, labels)}, built once per run; for latent runs
    each is followed by the decoder (images out)."""
    if self._sample_fns is None:
      num_classes = self.source.num_classes
      fns = sweep_samplers.make_sample_fns(self.flow_map, sweep_samplers.specs_from_config(self.config),
                                 null_label=num_classes or None,
                                 guidance_scale=self.config.eval.guidance_scale,
                                 guidance_input=bool(self.config.model.get('guidance_conditioning')),
                                 guidance_interval=tuple(self.config.eval.get('guidance_interval', (0.0, 1.0))))
      if self.latent and not self.toy:
        decode = decoder(self.autoencoder, self.mesh)
        fns = {spec: (lambda fn: lambda params, x0, labels: decode(fn(params, x0, labels)))(fn)
               for spec, fn in fns.items()}
      self._sample_fns = fns
    return self._sample_fns

  def __call__(self, state, step: int, logger, *, final: bool) -> dict:
    """The sweep of `state` at `step`; returns its results (on every process)."""
    config = self.config
    params = train_state.select_params(state, config.eval.ema_index)
    key = jax.random.fold_in(jax.random.PRNGKey(config.seed), _NOISE_SALT)
    if self.toy:
      results, samples, reference = self._toy(params, key)
    else:
      results, samples = self._images(params, key, step)
      reference = None
    results = {'step': step, **results}
    if self.toy and self.target_note:
      results['target'] = self.target_note
    # Gathers are collectives: every process joins them before process 0 alone writes.
    samples = {spec: np.asarray(sharding.gather_to_host(x)) for spec, x in samples.items()}
    if reference is not None:
      reference = np.asarray(sharding.gather_to_host(reference))
    if not logging_utils.is_main_process():
      return results
    self._write_samples(step, samples, logger, reference)
    logger.info(report.format_table(results))
    report.write_outputs(results, self.workdir, final=final, logger=logger)
    return results

  # ------------------------------------------------------------------------- toys

  def _toy(self, params, key):
    config = self.config
    n = config.eval.num_samples - config.eval.num_samples % jax.device_count()
    x0 = jax.jit(lambda k: jax.random.normal(k, (n,) + tuple(self.source.example_shape)),
                 out_shardings=sharding.batch_sharding(self.mesh))(key)
    reference = self._reference_samples(jax.random.PRNGKey(0xBEEF), n)
    other = self._reference_samples(jax.random.PRNGKey(0xF00D), n)
    results, samples = sweep.toy_sweep(
        self.sample_fns, params, x0, None, reference, reference_other=other,
        target=self.target, interpolant=self.interpolant, flow_map=self.flow_map,
        key=jax.random.fold_in(key, 1), exact_pairs=tuple(tuple(p) for p in config.eval.exact_pairs))
    return results, samples, reference

  def _reference_samples(self, key, n: int):
    """n samples of what the sweep scores against, split over the batch axes like x0."""
    if self.target is self.source.target:
      return self.source.reference_samples(key, n)
    # The same key on every process gives the same host array, placed on the global sharding.
    host = np.asarray(self.target.sample(key, n))
    return jax.make_array_from_callback(host.shape, sharding.batch_sharding(self.mesh),
                                        lambda index: host[index])

  # ------------------------------------------------------------------------- images

  def _images(self, params, key, step: int):
    """FID per sampler when enabled (or, deferred, its images written for `reference_batches` to
    score), else just config.eval.grid_size^2 samples for the grids."""
    config = self.config
    shape, num_classes = tuple(self.source.example_shape), self.source.num_classes
    batch_sharding = sharding.batch_sharding(self.mesh)
    grid = config.eval.grid_size ** 2
    if not assets.fid_enabled(config):
      n = grid + (-grid) % jax.device_count()
      (x0, labels, _), = sweep.noise_batches(key, shape, n, n, num_classes=num_classes,
                                             sharding=batch_sharding)
      return {'few_step': {}, 'ode': {}}, {
          spec: np.asarray(sharding.gather_to_host(fn(params, x0, labels)))[:grid]
          for spec, fn in self.sample_fns.items()}
    batch = config.eval.fid_batch_size
    batch -= batch % jax.device_count()
    if not batch:
      raise ValueError(f'config.eval.fid_batch_size must be at least the {jax.device_count()} devices.')
    deferred = assets.deferred(config)
    feature_fn = None if deferred else self._features(batch)
    noise = lambda: sweep.noise_batches(key, shape, config.eval.fid_num_samples, batch,
                                        num_classes=num_classes, sharding=batch_sharding)
    provenance = {'dataset': f'{config.data.name} (generated)', 'split': 'samples'}
    if deferred or getattr(feature_fn, 'feature_fn', None) is inception.features:
      provenance.update(resize=resize.RESIZE_MODE, feature_extractor=fid.extractor_id())
    if self.latent:
      provenance['autoencoder'] = self.autoencoder.digest
      crop = (getattr(self.source, 'latent_info', None) or {}).get('crop')
      if crop:
        provenance['crop'] = crop
    sink = None
    if deferred:
      reference, reference_features = None, None
      folder = os.path.join(self.workdir, 'eval_images', f'step_{step}')
      sink = sample_batches.SampleBatchWriter(folder, provenance)
    else:
      reference, reference_features = self._reference_inputs(feature_fn)
    results, kept = sweep.image_sweep(self.sample_fns, params, noise, feature_fn, reference,
                             config.eval.fid_num_samples, keep=grid, provenance=provenance,
                             log=_main_print, progress=_main_print,
                             progress_every=float(config.eval.get('progress_every', 30.0)),
                             reference_features=reference_features,
                             precision_recall_samples=config.eval.get('precision_recall_samples', 0),
                             class_probs=self._class_probs(),
                             confidence=config.eval.get('classifier_confidence', 0.9),
                             image_sink=sink)
    if sink is not None:
      sink.close()
      results['fid_deferred'] = folder
      _main_print(f'  FID deferred: {len(sink.paths)} sample batches in {folder}; score them with\n'
                  f'    python -m fmjax.evaluation.reference_batches {assets.reference_path(config)} '
                  f'{folder}/*.npz')
    return results, kept

  def _class_probs(self):
    """Host images -> class probabilities of config.eval.classifier_dir's classifier, or None."""
    folder = self.config.eval.get('classifier_dir', '')
    if not folder:
      return None
    if self._classifier is None:
      from fmjax.steering import classifier   # pylint: disable=import-outside-toplevel
      model, _ = classifier.load(folder)
      logits = jax.jit(classifier.logits_fn(model))
      self._classifier = lambda images: np.asarray(jax.nn.softmax(logits(images), axis=-1))
    return self._classifier

  def _reference_inputs(self, feature_fn):
    """(reference statistics, features of its images or None), read once per run.

    A reference file with images (an ADM reference batch) gives both: its mu/sigma when it has
    them (as the ADM evaluator), the features of its images for precision/recall."""
    if self._reference is None:
      ref = assets.load_reference(self.config)
      features = None
      wants_pr = self.config.eval.get('precision_recall_samples', 0) > 0
      if ref.num_images and (wants_pr or ref.stats is None):
        _main_print(f'  reference images: features of {ref.num_images} images of {ref.path}')
        features = reference_images_features(ref, feature_fn)
      self._reference = (reference_batches.reference_statistics(ref, features),
                         features if wants_pr else None)
    return self._reference

  def _features(self, batch: int):
    """The Inception feature extractor, built (and its weights read) once per run."""
    if self._feature_fn is None:
      self._feature_fn = fid.FeatureExtractor(
          inception.load_params(assets.weights_path(self.config)), batch_size=batch,
          mesh=self.mesh, data_axis=sharding.BATCH_AXES)
    return self._feature_fn

  # ------------------------------------------------------------------------- pictures

  def _write_samples(self, step: int, samples: dict, logger, reference) -> None:
    """Scatter plots (toys) or image grids of every sampler to WORKDIR/samples and TensorBoard.

    Non-finite samples are left out of the scatter plots and drawn black in the image grids
    (the table counts them)."""
    if self.toy:
      finite = lambda x: x[np.all(np.isfinite(x.reshape(len(x), -1)), axis=1)]
      panels = [(spec.label, finite(v)) for spec, v in samples.items() if spec.family == 'flow_map']
      odes = [(spec.label, finite(v)) for spec, v in samples.items() if spec.family == 'ode']
      panels += odes[-1:]   # the most accurate ODE solve, for comparison
      picture = plotting.scatter_png(
          os.path.join(self.workdir, 'samples', f'step_{step}.png'), panels, reference)
      logger.image(step, 'samples/few_step', picture)
      return
    for spec, v in samples.items():
      g = plotting.image_grid(np.clip(np.nan_to_num(v, nan=-1.0, posinf=1.0, neginf=-1.0), -1, 1),
                                   self.config.eval.grid_size)
      name = (f'{spec.steps}steps' if spec.family == 'flow_map'
              else f'ode_{spec.method}_{spec.nfe}nfe')
      plotting.save_png(os.path.join(self.workdir, 'samples', f'step_{step}_{name}.png'), g)
      logger.image(step, f'samples/{name}', g if g.ndim == 3 else g[..., None])


@dataclasses.dataclass(frozen=True)
class RejectionTilted:
  """Exact samples of q(x) ∝ p(x) exp(r(x) / lambda) for a reward r <= 0 (von Neumann's
  rejection sampling): x ~ p is kept with probability exp(r(x) / lambda) <= 1, so kept samples
  have density p exp(r / lambda) / Z = q. No exact flow map (the RMSE columns are left out).

  base: a toy target (sample(key, n), dim); reward(x, labels) -> [n]; temperature: lambda > 0.
  """

  base: Any
  reward: Callable
  temperature: float
  max_candidates: int = 20_000_000

  @property
  def dim(self) -> int:
    return self.base.dim

  def sample(self, key, n: int) -> jax.Array:
    kept, have, drawn, i = [], 0, 0, 0
    while have < n:
      key_x, key_u = jax.random.split(jax.random.fold_in(key, i))
      m = 4 * max(n - have, 256) if not drawn else min(64 * max(n - have, 256), self.max_candidates)
      x = self.base.sample(key_x, m)
      r = np.asarray(self.reward(x, None), np.float64)
      if np.any(r > 0):
        raise ValueError(f'rejection sampling of the tilted target needs a reward <= 0; got up to '
                         f'{r.max():.3g} (subtract an upper bound from the reward).')
      accept = np.asarray(jax.random.uniform(key_u, (m,)), np.float64) < np.exp(r / self.temperature)
      kept.append(np.asarray(x)[accept])
      have, drawn, i = have + int(accept.sum()), drawn + m, i + 1
      if have < n and drawn >= self.max_candidates:
        raise ValueError(f'the tilted target keeps {have} of {drawn} base samples: too few to '
                         f'evaluate against {n} samples (raise the temperature or the reward width).')
    return jnp.asarray(np.concatenate(kept)[:n])


def evaluation_target(config, base_target) -> tuple[Any, str | None]:
  """(target, note): what a toy run's sweep scores against.

  A reward fine-tuning run (loss.name in `finetune.RULE_NAMES`) trains toward the tilted law
  q ∝ p exp(r / lambda) (config.finetune: reward, center, std, temperature lambda), so it is
  scored against q: the closed form of `fmjax.steering.tilted` for the quadratic reward on a
  Gaussian or Gaussian mixture (with its exact flow map), `RejectionTilted` samples for the other
  built-in rewards (r <= 0), the data with a note saying so for any other reward.
  Every other run: (base_target, None).
  """
  from fmjax.data import toy   # pylint: disable=import-outside-toplevel
  from fmjax.steering import finetune, rewards, tilted   # pylint: disable=import-outside-toplevel
  if config.loss.name not in finetune.RULE_NAMES or 'finetune' not in config:
    return base_target, None
  f = config.finetune
  lam = float(f.temperature)
  what = f'q ∝ p exp(r / {lam:g}), reward {f.reward}'
  if f.reward == 'quadratic':
    center = np.broadcast_to(np.asarray(f.center, np.float64), (base_target.dim,))
    if isinstance(base_target, toy.GaussianTarget):
      return tilted.tilt_gaussian(base_target, center, float(f.std), lam), f'tilted {what}, closed form'
    if isinstance(base_target, toy.GaussianMixtureTarget):
      return (tilted.tilt_gaussian_mixture(base_target, center, float(f.std), lam),
              f'tilted {what}, closed form')
    reward = rewards.quadratic(np.asarray(center, np.float32), float(f.std))
  elif f.reward == 'one_sided':
    reward = rewards.one_sided_quadratic()
  else:   # never fail at the end of a run: score against the data and say so
    return base_target, f'untilted data p (no tilted target for reward {f.reward!r})'
  return RejectionTilted(base_target, reward, lam), f'tilted {what}, exact samples by rejection'


def decoder(autoencoder, mesh):
  """z -> images: the autoencoder's decoder of latents scaled by its scaling factor (what latent
  flow maps generate), x = D(z / scaling_factor), jitted once per batch shape; z keeps its batch
  sharding and the decoder's parameters are replicated over the run's mesh."""
  params = jax.device_put(jax.device_get(autoencoder.params), sharding.replicated(mesh))
  decode = jax.jit(autoencoder.decode_scaled_fn)
  return lambda z: decode(params, z)


def reference_images_features(ref, feature_fn) -> np.ndarray:
  """Features [N, d] of every image of a reference file, each process feeding its share of each
  batch (the extractor gathers all processes' features)."""
  p, count = jax.process_index(), jax.process_count()
  batch = getattr(feature_fn, 'batch_size', 200)
  return np.concatenate([np.asarray(feature_fn(images[p::count]), np.float64)
                         for images in ref.image_batches(batch)])


def _main_print(line: str) -> None:
  if logging_utils.is_main_process():
    print(line, flush=True)
