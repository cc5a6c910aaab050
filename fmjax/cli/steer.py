"""--mode=steer: reward-steered samples of a trained workdir -> WORKDIR/steer/NAME/.

Reads config.steer (fmjax.configs), builds the reward (fmjax.steering.rewards.from_config, the
factory reward fine-tuning uses too), calls `fmjax.load(WORKDIR).steer(...)` and writes, into a
folder of its own per run (NAME = config.steer.name, or `run_name`: the method, the reward, the
main options and a digest of every option in force, so runs with other options never overwrite
each other):

  samples.npy            the steered samples
  baseline_samples.npy   the unsteered baseline (below)
  metrics.json           every config.steer option in force ('options'), the reward's options
                         ('reward_options': center/std, or classifier_dir/target_class), the
                         checkpoint step and which weights, the steered metrics and, under
                         'baseline', the same metrics of the baseline
  samples.png            baseline and steered samples side by side (2-D) or the steered grid

The baseline is the unsteered base sampler: config.steer.steps flow-map steps from the same seed
and the same noise rows (guidance and SMC start row i from the noise the baseline maps to its
row i; best-of-N draws its candidates from the same stream), so the two columns differ by the
steering alone. Its NFE is steps per sample; the steered NFE (network evaluations per returned
sample, gradients counted as forward + backward) is larger: best-of-N costs N x steps, guidance
and SMC add the look-ahead's evaluations. The baseline is the sampler being steered, at the same
step count, not a sampler given the steered run's NFE budget.

Metrics: nfe, mean_reward, ess (mean and minimum over steps, where the method tracks it) and, for
the toy targets with an exact law ('gaussian', 'gmm') and the quadratic reward, the energy
distance to exact samples of the tilted target q ∝ p exp(r / lambda) (fmjax.steering.tilted;
of the first ENERGY_ROWS samples), with the noise floor of two exact draws beside it, and for
'gmm' the mass per mode against the tilted weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import numpy as np

from fmjax import api, configs, logging_utils, plotting
from fmjax.data import pipelines, toy
from fmjax.evaluation import toy_metrics
from fmjax.steering import methods, rewards, tilted

# The energy distance is O(n^2) in the sample count: it uses the first this many samples.
ENERGY_ROWS = 8192
# The reward is evaluated on this many samples at a time (a classifier on images).
REWARD_CHUNK = 4096


def make_reward(config):
  """config.steer's reward r(x, labels) (fmjax.steering.rewards.from_config)."""
  try:
    return rewards.from_config(config.steer)
  except ValueError as e:
    raise configs.ConfigError(f'config.steer: {e}') from None


def steer_options(config) -> dict:
  """Model.steer's keyword options (the temperature included) from config.steer, for its method:
  its options dataclass (fmjax.steering.methods), as a dict."""
  return dataclasses.asdict(methods.options_from_config(config.steer))


def options_in_force(config) -> dict:
  """Every config.steer option as JSON data (the run's name excluded)."""
  out = json.loads(config.steer.to_json_best_effort())
  out.pop('name', None)
  return out


def run_name(config) -> str:
  """The run's folder name: config.steer.name, or the method, the reward, the main options and
  an 8-hex digest of every option in force (any other option gives another folder)."""
  st = config.steer
  if st.get('name'):
    return st.name
  options = options_in_force(config)
  parts = [st.method, st.reward, f'lambda{float(st.temperature):g}', f'steps{int(st.steps)}']
  if 'num_particles' in methods.option_names(st.method):
    parts.append(f'particles{int(st.num_particles)}')
  if st.reward == 'classifier':
    parts.append(f'class{int(st.target_class)}')
  if st.get('label', -1) >= 0:
    parts.append(f'label{int(st.label)}')
  parts.append(f'seed{int(st.seed)}')
  digest = hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]
  return '_'.join(parts + [digest])


def exact_tilted_target(config):
  """The closed-form tilted toy target, or None where there is none (images, checkerboard,
  rings, the one-sided and classifier rewards)."""
  st = config.steer
  if st.reward != 'quadratic' or config.data.name not in ('gaussian', 'gmm'):
    return None
  target = pipelines.make_toy_target(config.data)
  center = np.broadcast_to(np.asarray(st.center, np.float64), (target.dim,))
  if isinstance(target, toy.GaussianTarget):
    return tilted.tilt_gaussian(target, center, float(st.std), float(st.temperature))
  return tilted.tilt_gaussian_mixture(target, center, float(st.std), float(st.temperature))


def mean_reward(reward, x, labels) -> float:
  """The mean of reward(x, labels) over the samples, REWARD_CHUNK rows at a time."""
  total = 0.0
  for first in range(0, x.shape[0], REWARD_CHUNK):
    y = None if labels is None else labels[first:first + REWARD_CHUNK]
    total += float(np.sum(np.asarray(reward(x[first:first + REWARD_CHUNK], y), np.float64)))
  return total / x.shape[0]


def sample_metrics(config, x, reward, labels=None, nfe: int | None = None, ess=None) -> dict:
  """mean_reward, nfe, ess and the exact-target comparisons of samples x (see the module doc)."""
  st = config.steer
  x = np.asarray(x)
  out = {'num_samples': int(x.shape[0]), 'mean_reward': mean_reward(reward, x, labels)}
  if nfe is not None:
    out['nfe'] = int(nfe)
  if ess is not None:
    ess = np.asarray(ess)
    out['ess_mean'], out['ess_min'] = float(ess.mean()), float(ess.min())
  target = exact_tilted_target(config)
  if target is not None:
    rows = x[:ENERGY_ROWS]
    key_a, key_b = jax.random.split(jax.random.PRNGKey(int(st.seed) + 1))
    exact = np.asarray(target.sample(key_a, rows.shape[0]))
    out['energy_distance'] = float(toy_metrics.energy_distance(rows, exact))
    # Two independent exact draws: the sampling noise floor of the distance at this sample size.
    out['energy_distance_floor'] = float(toy_metrics.energy_distance(
        np.asarray(target.sample(key_b, rows.shape[0])), exact))
    if isinstance(target, toy.GaussianMixtureTarget):
      masses = tilted.mode_masses(target, x)
      out['mode_mass'] = masses.tolist()
      out['mode_mass_exact'] = np.asarray(target.weights, np.float64).tolist()
      out['mode_mass_error'] = float(np.max(np.abs(masses - target.weights)))
  return out


def steer_metrics(config, result, reward, labels=None) -> dict:
  """The steered run's metrics (with the headline options beside them)."""
  st = config.steer
  out = {'method': st.method, 'reward': st.reward, 'temperature': float(st.temperature),
         'steps': int(st.steps)}
  if 'num_particles' in methods.option_names(st.method):
    out['num_particles'] = int(st.num_particles)
  out.update(sample_metrics(config, result.samples, reward, labels, result.nfe, result.ess))
  return out


def steer_labels(config, model):
  """int32 [num_samples] of config.steer.label, or None (-1: the null label)."""
  st = config.steer
  label = int(st.get('label', -1))
  if label < 0:
    return None
  if not model.num_classes:
    raise configs.ConfigError(f'config.steer.label = {label}: this run is unconditional (trained '
                              'without labels); leave config.steer.label at -1.')
  if label >= model.num_classes:
    raise configs.ConfigError(f'config.steer.label = {label}: the run has classes 0 .. '
                              f'{model.num_classes - 1}; choose one of them, or -1 for none.')
  return np.full((int(st.num_samples),), label, np.int32)


def steer_to_workdir(config, workdir: str) -> dict:
  """config.steer -> WORKDIR/steer/NAME/{samples.npy, baseline_samples.npy, metrics.json,
  samples.png}; returns the metrics (with 'folder', the run's folder)."""
  st = config.steer
  reward = make_reward(config)   # a missing classifier fails here, before loading the model
  restore_step = config.train.restore_step
  model = api.load(workdir, None if restore_step < 0 else restore_step)
  labels = steer_labels(config, model)
  key = jax.random.PRNGKey(int(st.seed))
  num, steps = int(st.num_samples), int(st.steps)
  result = model.steer(key, num, reward, method=st.method, steps=steps, labels=labels,
                       **steer_options(config))
  # The unsteered base sampler on the same noise rows: Model.steer draws its starting noise with
  # the first half of split(key) (api.Model.steer's chunk_size note).
  baseline = model.sample(jax.random.split(key)[0], num, steps=steps, labels=labels)
  name = run_name(config)
  out = os.path.join(workdir, 'steer', name)
  metrics = {'name': name, 'folder': out, 'step': int(model.step)}
  if getattr(model, 'weights', ''):
    metrics['weights'] = model.weights
  metrics.update(steer_metrics(config, result, reward, labels))
  metrics['reward_options'] = rewards.describe(st)
  metrics['target_class'] = int(st.target_class) if st.reward == 'classifier' else None
  metrics['classifier_dir'] = st.classifier_dir if st.reward == 'classifier' else None
  metrics['label'] = int(st.get('label', -1))
  metrics['options'] = options_in_force(config)
  metrics['baseline'] = dict(
      sampler=f'{steps}-step flow map, unsteered, same seed and noise rows',
      **sample_metrics(config, baseline, reward, labels, nfe=steps))
  if not logging_utils.is_main_process():
    return metrics
  os.makedirs(out, exist_ok=True)
  x = np.asarray(result.samples)
  np.save(os.path.join(out, 'samples.npy'), x)
  np.save(os.path.join(out, 'baseline_samples.npy'), np.asarray(baseline))
  with open(os.path.join(out, 'metrics.json'), 'w') as f:
    json.dump(metrics, f, indent=2)
  title = f'{st.method}, lambda = {st.temperature}, {metrics["nfe"]} NFE'
  if x.ndim == 2:
    plotting.scatter_png(os.path.join(out, 'samples.png'),
                              [(f'unsteered, {steps} NFE', np.asarray(baseline)), (title, x)])
  else:
    columns = int(np.ceil(np.sqrt(min(len(x), 64))))
    plotting.save_png(os.path.join(out, 'samples.png'), plotting.image_grid(x[:64], columns))
  print(f'wrote {out}/samples.npy, baseline_samples.npy, metrics.json and samples.png: ' + json.dumps(
      {'method': metrics['method'], 'nfe': metrics['nfe'], 'mean_reward': metrics['mean_reward'],
       'baseline_mean_reward': metrics['baseline']['mean_reward']}))
  return metrics
