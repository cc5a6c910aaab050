"""Every flow-map training rule as a pure function, by name.

  rule = fmjax.losses.make('lsd', flow_map, interpolant, **options)
  params = rule.init(net_params, key)
  loss, metrics = rule(params, {'x1': data, 'labels': labels}, key)

See `RULES` for the names, and README.md for each rule's equation and paper. Options are
the fields of `base.CommonOptions` plus the rule's own keyword arguments; a wrong name is
an error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, NamedTuple

from fmjax.losses import base, consistency, distill, eulerian, lagrangian, semigroup
from fmjax.losses.base import CommonOptions, Rule
from fmjax.losses.times import TimeDistribution

_MEANFLOW_TIMES = {'name': 'logit_normal', 'mean': 0.4, 'std': 1.0}   # MeanFlow's (-0.4, 1.0) in fmjax time


class RuleSpec(NamedTuple):
  builder: Callable
  teacher: str            # 'none', 'optional' or 'required'
  defaults: dict
  fixed: dict = {}        # rule options the name implies


def _flow_matching(ctx):
  return base.two_part_rule(ctx, off_diagonal_fn=None)


RULES: dict[str, RuleSpec] = {
    'flow_matching': RuleSpec(_flow_matching, 'optional', {'diagonal_fraction': 1.0}),
    'lsd': RuleSpec(lagrangian.lagrangian_rule, 'none', {}),
    'esd': RuleSpec(eulerian.eulerian_rule, 'none', {}),
    'psd': RuleSpec(semigroup.semigroup_rule, 'none', {}),
    'meanflow': RuleSpec(eulerian.meanflow_rule, 'optional',
                         {'times': _MEANFLOW_TIMES, 'weighting': 'adaptive'}),
    'imf': RuleSpec(eulerian.meanflow_rule, 'optional',
                    {'times': _MEANFLOW_TIMES, 'weighting': 'adaptive'}, {'improved': True}),
    'shortcut': RuleSpec(semigroup.semigroup_rule, 'none', {'diagonal_fraction': 0.875},
                         {'intermediate': 'midpoint', 'space': 'v', 'dyadic_levels': 7}),
    'sct': RuleSpec(consistency.sct_rule, 'optional', {'diagonal_fraction': 0.0}),
    'ect': RuleSpec(consistency.ect_rule, 'optional', {'diagonal_fraction': 0.0}),
    'lmd': RuleSpec(lagrangian.lagrangian_rule, 'required', {}),
    'emd': RuleSpec(eulerian.eulerian_rule, 'required', {'eulerian_gradient': 'residual'}),
    'progressive': RuleSpec(semigroup.semigroup_rule, 'required', {'intermediate': 'midpoint'}),
    'fmm': RuleSpec(distill.trajectory_rule, 'required', {'diagonal_fraction': 0.0}),
}


def _own_options(builder) -> set[str]:
  return set(inspect.signature(builder).parameters) - {'ctx'}


def make(name: str, flow_map, interpolant, teacher=None, **options) -> Rule:
  """Builds the rule `name` (see RULES) with config options; teacher(t, x, labels) -> b_t(x)."""
  if name not in RULES:
    raise ValueError(f'Unknown loss {name!r}; choose one of {sorted(RULES)}.')
  spec = RULES[name]
  if spec.teacher == 'required' and teacher is None:
    raise ValueError(f"Rule {name!r} distills a teacher: pass teacher=b(t, x, labels).")
  if spec.teacher == 'none' and teacher is not None:
    raise ValueError(f"Rule {name!r} trains from scratch; for distillation from a teacher use "
                     "'lmd', 'emd', 'progressive' or 'fmm' (or 'meanflow', 'imf', 'sct', 'ect').")
  settings = {**spec.defaults, **options}
  common_fields = {f.name for f in dataclasses.fields(CommonOptions)}
  own = _own_options(spec.builder)
  unknown = set(settings) - common_fields - own
  clashing = set(options) & set(spec.fixed)
  if unknown or clashing:
    raise ValueError(f'Unknown option(s) {sorted(unknown | clashing)} for loss {name!r}; valid: '
                     f'{sorted((common_fields | own) - set(spec.fixed))}.')
  if name == 'flow_matching' and settings.get('diagonal_fraction') != 1.0:
    raise ValueError('flow_matching trains only the diagonal: diagonal_fraction must be 1.0.')
  common = {k: v for k, v in settings.items() if k in common_fields}
  for key in ('times', 'diagonal_times'):
    if isinstance(common.get(key), dict) or hasattr(common.get(key), 'to_dict'):
      value = common[key]
      common[key] = TimeDistribution(**(value.to_dict() if hasattr(value, 'to_dict') else value))
  common_options = CommonOptions(**common)
  rule_options = {k: v for k, v in settings.items() if k in own}
  rule_options.update(spec.fixed)
  if name == 'progressive' and 'teacher_map' not in rule_options:
    rule_options['teacher_map'] = semigroup.teacher_heun_map(teacher)
  ctx = base.Context(flow_map, interpolant, teacher, common_options)
  return Rule(name, spec.builder(ctx, **rule_options), common_options)


__all__ = ['make', 'RULES', 'Rule', 'CommonOptions', 'TimeDistribution']
