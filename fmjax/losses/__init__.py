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
import warnings
from typing import Callable, NamedTuple

from fmjax import samplers
from fmjax.losses import base, consistency, distill, eulerian, imf, lagrangian, semigroup
from fmjax.losses.base import CommonOptions, Rule
from fmjax.losses.times import TimeDistribution

_MEANFLOW_TIMES = {'name': 'logit_normal', 'mean': 0.4, 'std': 1.0}   # MeanFlow's (-0.4, 1.0) in fmjax time
# MeanFlow's reference code (Gsunshine/meanflow, configs/default.py): P_mean = -0.4, P_std = 1.0,
# data_proportion = 0.75 (rows with r = t, their time from the same pair draw: meanflow_rule's
# diagonal_time = 'pair'), norm_p = 1.0, norm_eps = 0.01 on the summed squared error. The
# paper's own value of c is not checked here; fmjax follows the reference code.
_MEANFLOW_DEFAULTS = {'times': _MEANFLOW_TIMES, 'weighting': 'adaptive', 'adaptive_eps': 0.01}
# iMF's reference code (Lyy-iiis/imeanflow, configs/default.py): as MeanFlow's, but
# data_proportion = 0.5 (half the rows have r = t).
_IMF_DEFAULTS = {**_MEANFLOW_DEFAULTS, 'diagonal_fraction': 0.5}


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
    'meanflow': RuleSpec(eulerian.meanflow_rule, 'optional', _MEANFLOW_DEFAULTS),
    'imf': RuleSpec(imf.imf_rule, 'optional', _IMF_DEFAULTS, {'improved': True}),
    'shortcut': RuleSpec(semigroup.semigroup_rule, 'none', {'diagonal_fraction': 0.875},
                         {'intermediate': 'midpoint', 'space': 'v', 'dyadic_levels': 7}),
    # sCM's learned adaptive weight e^{w(t)} |.|^2 / D - w(t) (Lu & Song 2410.11081, Alg. 1) is
    # fmjax's 'learned' log-variance with u = -w.
    'sct': RuleSpec(consistency.sct_rule, 'optional', {'diagonal_fraction': 0.0, 'weighting': 'learned'}),
    'ect': RuleSpec(consistency.ect_rule, 'optional', {'diagonal_fraction': 0.0}),
    'lmd': RuleSpec(lagrangian.lagrangian_rule, 'required', {}),
    'emd': RuleSpec(eulerian.eulerian_rule, 'required', {'eulerian_gradient': 'residual'}),
    'progressive': RuleSpec(semigroup.progressive_rule, 'required', {}),
    'trajectory_distillation': RuleSpec(distill.trajectory_rule, 'required', {'diagonal_fraction': 0.0}),
}
# 'fmm' was this rule's earlier name. In Boffi et al. 2406.07507 "flow map matching" names the
# whole framework (abstract), not the regression onto teacher ODE solutions, so the rule was
# renamed; the old name stays a deprecated alias (same spec; make() warns).
DEPRECATED_ALIASES = {'fmm': 'trajectory_distillation'}
RULES['fmm'] = RULES['trajectory_distillation']


def _finetune_rules() -> dict[str, RuleSpec]:
  """The reward fine-tuning rules (fmjax.steering.finetune.FINETUNE_RULES), kept apart from RULES.

  Imported when first asked for, not at module level: fmjax.steering.finetune builds on the rule
  modules of this package, so importing it here at import time would make a cycle (whichever of
  the two a program imported first would see the other half-initialized).
  """
  from fmjax.steering import finetune   # pylint: disable=import-outside-toplevel
  return finetune.FINETUNE_RULES


def __getattr__(name: str):
  # fmjax.losses.FINETUNE_RULES, resolved lazily (PEP 562) for the reason in _finetune_rules.
  if name == 'FINETUNE_RULES':
    return _finetune_rules()
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def rule_spec(name: str) -> RuleSpec:
  """The RuleSpec of loss `name` (RULES or FINETUNE_RULES), or one error listing the names.

  make() and resolve_options() take both kinds of name.
  """
  if name in RULES:
    return RULES[name]
  finetune_rules = _finetune_rules()
  if name in finetune_rules:
    return finetune_rules[name]
  raise ValueError(f'Unknown loss {name!r}; choose one of {sorted({**RULES, **finetune_rules})}.')


def is_registered(name: str) -> bool:
  """Whether `name` is a training rule this process knows (RULES or the fine-tuning rules)."""
  return name in RULES or name in _finetune_rules()


TEACHER_KINDS = ('none', 'optional', 'required')


def register(name: str, builder: Callable, *, teacher: str = 'none', defaults: dict | None = None,
             fixed: dict | None = None, replace: bool = False) -> RuleSpec:
  """Adds a training rule to RULES, e.g. from an experiment file, before its get_config runs:

    def my_rule(ctx, scale: float = 1.0): ...        # -> off_diagonal / two_part_rule(ctx, ...)
    losses.register('my_rule', my_rule)

  builder(ctx: base.Context, **options) returns the rule's loss function (see the rules in
  lagrangian.py / eulerian.py). Its keyword options with a float / int / str / bool annotation
  become config.loss fields of every config made afterwards (configs.base_config), so they are
  settable from the command line (--config.loss.scale=2.5); the common options
  (base.CommonOptions) come with every rule. teacher: 'none', 'optional' or 'required' (a
  distillation rule reads config.teacher.workdir). defaults: the rule's defaults over the common
  ones; fixed: options the name implies. A run trained with such a rule loads and samples
  without it (fmjax.load needs only the network and the flow map's parameterization).
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f'A rule name must be a non-empty string, got {name!r}.')
  if is_registered(name) and not replace:
    raise ValueError(f'Loss {name!r} is already registered; pick another name (or replace=True).')
  if teacher not in TEACHER_KINDS:
    raise ValueError(f'teacher must be one of {TEACHER_KINDS}, got {teacher!r}.')
  parameters = list(inspect.signature(builder).parameters)
  if not parameters or parameters[0] != 'ctx':
    raise ValueError(f'The builder of {name!r} must take ctx (a losses.base.Context) as its first '
                     f'parameter, then keyword options; it takes {parameters}.')
  spec, previous = RuleSpec(builder, teacher, dict(defaults or {}), dict(fixed or {})), RULES.get(name)
  RULES[name] = spec
  try:
    resolve_options(name, {})   # the defaults build: a wrong default fails here, not in training
  except Exception:
    if previous is None:
      del RULES[name]
    else:
      RULES[name] = previous
    raise
  return spec


_COMMON_FIELDS = {f.name: f for f in dataclasses.fields(CommonOptions)}
TIME_OPTIONS = ('times', 'diagonal_times')      # options that are a TimeDistribution
# Option types the config can hold (annotations are strings under `from __future__ import
# annotations`); an option of another type (progressive's teacher_map) is for Python callers only.
_CONFIG_TYPES = {'float': float, 'int': int, 'str': str, 'bool': bool,
                 'float | None': float, 'int | None': int}


def _annotation_name(annotation) -> str:
  """'float' for `float` and for the string 'float' (rules written without `from __future__
  import annotations`, e.g. a user's rule in an experiment file); 'float | None' likewise."""
  if isinstance(annotation, str):
    return annotation
  return annotation.__name__ if isinstance(annotation, type) else str(annotation)


def _own_parameters(builder) -> dict[str, inspect.Parameter]:
  return {k: p for k, p in inspect.signature(builder).parameters.items() if k != 'ctx'}


def option_types() -> dict[str, type]:
  """Every option some rule understands that a config can set -> its type (TimeDistribution
  for the nested time options). fmjax.configs makes one config.loss field of each."""
  types = {k: (TimeDistribution if k in TIME_OPTIONS else _CONFIG_TYPES[str(f.type)])
           for k, f in _COMMON_FIELDS.items()}
  for spec in RULES.values():
    for k, p in _own_parameters(spec.builder).items():
      if _annotation_name(p.annotation) in _CONFIG_TYPES:
        types[k] = _CONFIG_TYPES[_annotation_name(p.annotation)]
  return types


def valid_options(name: str) -> list[str]:
  """The options loss `name` understands (its fixed ones excluded)."""
  spec = rule_spec(name)
  return sorted((set(_COMMON_FIELDS) | set(_own_parameters(spec.builder))) - set(spec.fixed))


def _as_dict(value) -> dict:
  if isinstance(value, TimeDistribution):
    return dataclasses.asdict(value)
  return value.to_dict() if hasattr(value, 'to_dict') else dict(value)


def _time_distribution(value) -> TimeDistribution:
  if isinstance(value, TimeDistribution):
    return value
  return TimeDistribution(**(value.to_dict() if hasattr(value, 'to_dict') else value))


def resolve_options(name: str, options: dict) -> dict:
  """Every option of loss `name` in force: `options` over the rule's defaults (RULES) over the
  defaults of CommonOptions and of the rule's builder; time options as full dicts.

  Checks names and values without building anything (cheap: configs call it before any data
  or device work). Raises ValueError naming the valid choices. Options the name implies
  (`RuleSpec.fixed`, e.g. iMF's improved=True) are included; setting one to another value
  is an error.
  """
  spec = rule_spec(name)
  own = _own_parameters(spec.builder)
  unknown = set(options) - set(_COMMON_FIELDS) - set(own)
  clashing = {k for k in set(options) & set(spec.fixed) if options[k] != spec.fixed[k]}
  if unknown or clashing:
    raise ValueError(f'Unknown option(s) {sorted(unknown | clashing)} for loss {name!r}; valid: '
                     f'{valid_options(name)}.')
  settings = {k: f.default for k, f in _COMMON_FIELDS.items()}
  settings.update({k: p.default for k, p in own.items() if p.default is not inspect.Parameter.empty})
  for source in (spec.defaults, options):
    for k, v in source.items():
      # A time option given in part (e.g. only its name) keeps the other fields in force.
      settings[k] = {**_as_dict(settings[k]), **_as_dict(v)} if k in TIME_OPTIONS else v
  settings.update(spec.fixed)
  for k in TIME_OPTIONS:
    settings[k] = dataclasses.asdict(_time_distribution(settings[k]))   # checks the name
  if name == 'flow_matching' and settings['diagonal_fraction'] != 1.0:
    raise ValueError('flow_matching trains only the diagonal: diagonal_fraction must be 1.0.')
  if 'ode_method' in settings and settings['ode_method'] not in samplers.ODE_METHODS:
    raise ValueError(f'Unknown ode_method {settings["ode_method"]!r}; choose one of '
                     f'{sorted(samplers.ODE_METHODS)}.')
  # The builders check their own values (intermediate, space, guidance needs null_label, ...)
  # and only close over the context: building one on an empty context costs nothing.
  common = _common_options(settings)
  spec.builder(base.Context(None, None, None, common),
               **{k: v for k, v in settings.items() if k in own and k != 'teacher_map'})
  return settings


def _common_options(settings: dict) -> CommonOptions:
  common = {k: v for k, v in settings.items() if k in _COMMON_FIELDS}
  for key in TIME_OPTIONS:
    common[key] = _time_distribution(common[key])
  return CommonOptions(**common)    # checks the common values


def make(name: str, flow_map, interpolant, teacher=None, **options) -> Rule:
  """Builds the rule `name` (see RULES) with config options; teacher(t, x, labels) -> b_t(x)."""
  rule_spec(name)   # an unknown name: one error listing the valid ones
  if name in DEPRECATED_ALIASES:
    warnings.warn(f'Loss {name!r} is a deprecated alias of {DEPRECATED_ALIASES[name]!r} '
                  '(in arXiv 2406.07507 "flow map matching" names the framework).',
                  DeprecationWarning, stacklevel=2)
  spec = rule_spec(name)
  if spec.teacher == 'required' and teacher is None:
    raise ValueError(f"Rule {name!r} distills a teacher: pass teacher=b(t, x, labels).")
  if spec.teacher == 'none' and teacher is not None:
    raise ValueError(f"Rule {name!r} trains from scratch; for distillation from a teacher use "
                     "'lmd', 'emd', 'progressive' or 'trajectory_distillation' (or 'meanflow', 'imf', "
                     "'sct', 'ect').")
  teacher_map = options.pop('teacher_map', None)
  settings = resolve_options(name, options)
  common_options = _common_options(settings)
  own = _own_parameters(spec.builder)
  rule_options = {k: v for k, v in settings.items() if k in own}
  if teacher_map is not None:
    rule_options['teacher_map'] = teacher_map
  ctx = base.Context(flow_map, interpolant, teacher, common_options)
  return Rule(name, spec.builder(ctx, **rule_options), common_options)


__all__ = ['make', 'register', 'is_registered', 'DEPRECATED_ALIASES', 'resolve_options', 'option_types', 'valid_options', 'RULES', 'FINETUNE_RULES', 'rule_spec', 'Rule', 'CommonOptions', 'TimeDistribution']
