"""What the toy experiments (toy_gaussian, toy_gmm, toy_gmm_nd, toy_checkerboard) share: their
ARG syntax and their per-rule defaults. An experiment helper, not part of the package: the toy
files load it from beside themselves (`sys.path.append` of their own folder), so it needs no
install and the package's config module holds no experiment's choices.
"""

import ml_collections


def rule_and_dim(arg: str | None, default_dim: int, default_rule: str = 'lsd') -> tuple[str, int]:
  """Parses a toy experiment's ARG, 'RULE[,DIM]' (either part may be left out)."""
  parts = (arg or '').split(',')
  rule = parts[0] or default_rule
  dim = int(parts[1]) if len(parts) > 1 and parts[1] else default_dim
  return rule, dim


def set_toy_rule(c: ml_collections.ConfigDict, rule: str) -> None:
  """config.loss.name = rule, and the toy experiments' rule defaults (for every rule name).

  MeanFlow's adaptive weight 1 / (|err|^2 + c)^p (p = 1, |err|^2 summed over dimensions, c = 0.01
  as in its reference code) turns the regression into
  E log(|err|^2 + c): in high dimension |err|^2 concentrates and this is harmless, but on 2-D
  data it favours the rows already fitted and its minimizer is no longer the conditional mean
  (measured on the checkerboard: the Heun ODE on the learned velocity lands on the dark squares
  87 % of the time with plain weighting, less and worsening with more steps with p = 1). Toy
  configs therefore train MeanFlow and iMF unweighted; image configs keep the paper's weight.
  sCT's tangent warmup is shortened to 100 steps on toys.
  These are defaults keyed by rule name, so `--config.loss.name=meanflow` gets them too.
  """
  c.loss.name = rule
  c.loss_defaults.meanflow = {'weighting': 'none'}
  c.loss_defaults.imf = {'weighting': 'none'}
  # sCT's tangent warmup (10k iterations by default, sCM's setting) would outlast a 1,000-5,000
  # step toy run and leave the tangent ramped down throughout; 100 steps keeps it a warmup.
  c.loss_defaults.sct = {'warmup_steps': 100}
