"""--mode=steer: reward-steered samples of a trained workdir -> WORKDIR/steer/.

Reads config.steer (fmjax.configs), builds the reward, calls `fmjax.load(WORKDIR).steer(...)`
and writes samples.npy, metrics.json and samples.png. metrics.json: method, nfe (network
evaluations per sample), mean_reward, ess (mean and minimum over steps, where the method tracks
it) and, for the toy targets with an exact law ('gaussian', 'gmm') and the quadratic reward, the
energy distance to exact samples of the tilted target q ∝ p exp(r / lambda)
(fmjax.steering.tilted), with the noise floor of two exact draws beside it, and for 'gmm' the
mass per mode against the tilted weights.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from fmjax import api, configs, logging_utils
from fmjax.data import pipelines, toy
from fmjax.evaluation import toy_metrics
from fmjax.steering import rewards, tilted


def make_reward(config):
  """config.steer's reward r(x, labels)."""
  st = config.steer
  if st.reward == 'quadratic':
    return rewards.quadratic(np.asarray(st.center, np.float32), float(st.std))
  try:
    from fmjax.steering import classifier   # helper module of issue 10
  except ImportError as e:
    raise configs.ConfigError(f"config.steer.reward = 'classifier' needs fmjax.steering.classifier "
                              f'({e}); use the quadratic reward or update fmjax.') from None
  return classifier.load_reward(st.classifier_dir, int(st.target_class))


def steer_options(config) -> dict:
  """Model.steer's keyword options from config.steer, for its method."""
  st = config.steer
  guide = dict(lookahead=st.lookahead, keep_jacobian=bool(st.keep_jacobian),
               guidance_scale=float(st.guidance_scale), guidance_stop=float(st.guidance_stop),
               schedule=st.schedule)
  if st.method == 'best_of_n':
    return dict(n=int(st.num_particles), select=st.select)
  if st.method == 'guidance':
    return guide
  return dict(guide, num_particles=int(st.num_particles), ess_threshold=float(st.ess_threshold))


def exact_tilted_target(config):
  """The closed-form tilted toy target, or None where there is none (images, checkerboard,
  rings, the classifier reward)."""
  st = config.steer
  if st.reward != 'quadratic' or config.data.name not in ('gaussian', 'gmm'):
    return None
  target = pipelines.make_toy_target(config.data)
  center = np.broadcast_to(np.asarray(st.center, np.float64), (target.dim,))
  if isinstance(target, toy.GaussianTarget):
    return tilted.tilt_gaussian(target, center, float(st.std), float(st.temperature))
  return tilted.tilt_gaussian_mixture(target, center, float(st.std), float(st.temperature))


def steer_metrics(config, result, reward) -> dict:
  st = config.steer
  x = np.asarray(result.samples)
  out = {'method': st.method, 'reward': st.reward, 'temperature': float(st.temperature),
         'steps': int(st.steps), 'num_samples': int(x.shape[0]), 'nfe': int(result.nfe),
         'mean_reward': float(np.mean(np.asarray(reward(result.samples, None))))}
  if st.method != 'guidance':
    out['num_particles'] = int(st.num_particles)
  if result.ess is not None:
    ess = np.asarray(result.ess)
    out['ess_mean'], out['ess_min'] = float(ess.mean()), float(ess.min())
  target = exact_tilted_target(config)
  if target is not None:
    key_a, key_b = jax.random.split(jax.random.PRNGKey(int(st.seed) + 1))
    exact = np.asarray(target.sample(key_a, x.shape[0]))
    out['energy_distance'] = float(toy_metrics.energy_distance(x, exact))
    # Two independent exact draws: the sampling noise floor of the distance at this sample size.
    out['energy_distance_floor'] = float(toy_metrics.energy_distance(
        np.asarray(target.sample(key_b, x.shape[0])), exact))
    if isinstance(target, toy.GaussianMixtureTarget):
      masses = tilted.mode_masses(target, x)
      out['mode_mass'] = masses.tolist()
      out['mode_mass_exact'] = np.asarray(target.weights, np.float64).tolist()
      out['mode_mass_error'] = float(np.max(np.abs(masses - target.weights)))
  return out


def steer_to_workdir(config, workdir: str) -> dict:
  """config.steer -> WORKDIR/steer/{samples.npy, metrics.json, samples.png}; returns the metrics."""
  st = config.steer
  reward = make_reward(config)   # a missing classifier fails here, before loading the model
  restore_step = config.train.restore_step
  model = api.load(workdir, None if restore_step < 0 else restore_step)
  options = steer_options(config)
  result = model.steer(jax.random.PRNGKey(int(st.seed)), int(st.num_samples), reward,
                       method=st.method, temperature=float(st.temperature), steps=int(st.steps),
                       **options)
  metrics = steer_metrics(config, result, reward)
  metrics['step'] = int(model.step)
  if not logging_utils.is_main_process():
    return metrics
  out = os.path.join(workdir, 'steer')
  os.makedirs(out, exist_ok=True)
  x = np.asarray(result.samples)
  np.save(os.path.join(out, 'samples.npy'), x)
  with open(os.path.join(out, 'metrics.json'), 'w') as f:
    json.dump(metrics, f, indent=2)
  title = f'{st.method}, lambda = {st.temperature}, {metrics["nfe"]} NFE'
  if x.ndim == 2:
    logging_utils.scatter_png(os.path.join(out, 'samples.png'), [(title, x)])
  else:
    columns = int(np.ceil(np.sqrt(min(len(x), 64))))
    logging_utils.save_png(os.path.join(out, 'samples.png'), logging_utils.image_grid(x[:64], columns))
  print(f'wrote {out}/samples.npy, metrics.json and samples.png: ' + json.dumps(
      {k: metrics[k] for k in ('method', 'nfe', 'mean_reward') if k in metrics}))
  return metrics
