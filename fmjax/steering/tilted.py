"""Closed-form tilted targets: q(x) ∝ p(x) exp(r(x) / lambda) for a quadratic reward.

For p = sum_k w_k N(mu_k, s_k^2 I) and r(x) = -|x - c|^2 / (2 sigma^2), completing the square
per component gives again a mixture (docs/steering.md):
  s'_k^2 = 1 / (1/s_k^2 + 1/(lambda sigma^2)),
  mu'_k  = s'_k^2 (mu_k / s_k^2 + c / (lambda sigma^2)),
  w'_k   ∝ w_k N(c; mu_k, (s_k^2 + lambda sigma^2) I).
Used as ground truth: the exact tilted samples, per-mode masses and velocities of q.
"""

from __future__ import annotations

import numpy as np

from fmjax.data.toy import GaussianMixtureTarget, GaussianTarget


def tilt_gaussian_mixture(target: GaussianMixtureTarget, center, reward_std: float,
                          temperature: float) -> GaussianMixtureTarget:
  """The mixture q ∝ p exp(-|x - c|^2 / (2 sigma^2 lambda)) (a new GaussianMixtureTarget)."""
  if not (reward_std > 0 and temperature > 0):
    raise ValueError('reward_std and temperature must be positive.')
  means = np.asarray(target.means, np.float64)
  var = np.asarray(target.stds, np.float64) ** 2
  w = np.asarray(target.weights, np.float64)
  c = np.broadcast_to(np.asarray(center, np.float64), means.shape[1:])
  tau = reward_std**2 * temperature                       # variance of the reward's Gaussian
  new_var = 1.0 / (1.0 / var + 1.0 / tau)
  new_means = new_var[:, None] * (means / var[:, None] + c / tau)
  d = means.shape[1]
  spread = var + tau
  log_w = (np.log(w) - 0.5 * np.sum((c - means) ** 2, -1) / spread - 0.5 * d * np.log(spread))
  new_w = np.exp(log_w - log_w.max())
  return GaussianMixtureTarget(new_means.astype(np.float32), np.sqrt(new_var).astype(np.float32),
                               (new_w / new_w.sum()).astype(np.float32), ode_steps=target.ode_steps)


def tilt_gaussian(target: GaussianTarget, center, reward_std: float, temperature: float) -> GaussianTarget:
  """N(m, diag(s^2)) tilted by the quadratic reward: N(m', diag(s'^2)) per dimension."""
  mean = np.asarray(target.mean, np.float64)
  var = np.asarray(target.std, np.float64) ** 2
  tau = reward_std**2 * temperature
  new_var = 1.0 / (1.0 / var + 1.0 / tau)
  new_mean = new_var * (mean / var + np.asarray(center, np.float64) / tau)
  return GaussianTarget(new_mean.astype(np.float32), np.sqrt(new_var).astype(np.float32))


def mode_masses(target: GaussianMixtureTarget, x) -> np.ndarray:
  """Share of the samples x [n, D] assigned to each component by the target's posterior at t = 1
  (the component of highest responsibility); compare with target.weights."""
  x = np.asarray(x, np.float64)
  means = np.asarray(target.means, np.float64)
  var = np.asarray(target.stds, np.float64) ** 2
  log_r = (np.log(np.asarray(target.weights, np.float64))[None]
           - 0.5 * np.sum((x[:, None] - means[None]) ** 2, -1) / var[None]
           - 0.5 * means.shape[1] * np.log(var)[None])
  k = np.argmax(log_r, axis=1)
  return np.bincount(k, minlength=means.shape[0]) / x.shape[0]
