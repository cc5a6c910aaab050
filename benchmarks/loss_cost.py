"""Cost of each training rule per step, as ratios to plain flow matching, measured in one run.

For one network and batch, every rule's full train step (loss, gradient by backprop through
whatever jvps the rule takes, Adam update) is compiled once; the table gives XLA's FLOP count
of the compiled step (cost_analysis), its measured time (median over interleaved repeats, so
that the machine's noise hits every rule alike) and the temporary memory XLA reports, each
divided by flow matching's. Two settings: every row off the diagonal (the rule's pure cost),
and the papers' mix of diagonal and off-diagonal rows (each rule's default fraction).

Beside XLA's count, an analytic FLOP ratio from counting network passes per row (PASSES):
with F one forward pass, a backward pass costs 2F, a jvp (primal and tangent) 2F and the
backward pass of a jvp 4F, so flow matching costs 3F per row, LSD 7F (a jvp with backprop
through its tangent, 6F, and the stopped target v_{t,t}(X), 1F) and a teacher's ODE solve 1F
per teacher evaluation. The two columns agree to ~2 % (XLA also counts the optimizer and
elementwise work); a larger gap means a rule does work it should not, or XLA missed some
(a loop body is counted once: the teacher solves are unrolled here so that it counts them all).

  python benchmarks/loss_cost.py                         # 4x512 MLP, batch 1024 (CPU: minutes)
  python benchmarks/loss_cost.py --model dit --batch 32  # any network of fmjax.models
  python benchmarks/loss_cost.py --out runs/loss_cost.md
"""

from __future__ import annotations

import argparse
import statistics
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fmjax import benchmarking, flow_maps, interpolants, losses, samplers
from fmjax.losses import base as losses_base
from fmjax.models import functional
from fmjax.models.mlp import MLP

# FLOP ratios to flow matching of the published implementations, measured once with their code
# on this project's CPU (see README): off-diagonal and at the papers' diagonal mix.
REFERENCE = {
    'lsd': ('2.32', '1.33'), 'esd': ('2.98', ''), 'psd': ('1.65', ''),
    'meanflow': ('', '1.36'), 'meanflow+cfg': ('', '2.03'), 'shortcut': ('', '1.08'),
}
TEACHER_RULES = ('lmd', 'emd', 'progressive', 'trajectory_distillation')

# Forward passes F per row of each configuration at its default options: (off-diagonal row,
# diagonal row). A diagonal row is flow matching (forward + backward, 3F), plus the teacher's
# velocity (1F) when distilling and the unconditional pass (1F) with guidance.
PASSES = {
    'flow_matching': (3, 3),
    'lsd': (7, 3),                 # jvp with backprop through its tangent 6F, stopped v_{t,t}(X) 1F
    'lsd (primal grad)': (5, 3),   # jvp 2F, backprop through the primal 2F, stopped target 1F
    'esd': (8, 3),                 # d/ds X with backprop 6F, stopped grad X w (its primal shared) 1F, w 1F
    'esd (primal grad)': (5, 3),   # one jvp 2F, backprop through the primal 2F, w 1F
    'psd': (5, 3), 'psd (midpoint)': (5, 3),   # X_{s,t} 3F, two stopped inner jumps 2F
    'shortcut': (5, 3),            # the same in v-space
    'meanflow': (4, 3),            # one jvp 2F, backprop through the primal 2F
    'imf': (5, 3),                 # MeanFlow's 4F and the model tangent sg[v_{s,s}] 1F
    'sct': (4, 3),                 # jvp in time 2F, backprop through the primal 2F
    'ect': (4, 3),                 # X_{s,1} 3F, stopped X_{s',1} 1F
    'meanflow+cfg': (6, 4),        # MeanFlow's 4F, one batched cond/uncond stopped pass 2F
    'lmd': (7, 4), 'emd': (7, 4),  # a jvp with backprop through its tangent 6F, teacher b 1F
}


def passes(label: str, name: str, options: dict) -> tuple[float, float]:
  """(off-diagonal, diagonal) forward passes per row; the teacher solves counted step by step."""
  if name == 'progressive':      # X_{s,t} 3F, two half jumps of teacher_steps Heun steps (2F each)
    return 3 + 2 * 2 * options['teacher_steps'], 4
  if name == 'trajectory_distillation':   # X_{s,t} 3F, the teacher's ODE solve from s to t
    return 3 + samplers.ode_nfe(options['ode_steps'], options['ode_method']), 4
  return PASSES[label]


def analytic_ratio(label: str, name: str, options: dict, batch: int) -> float:
  """Analytic FLOP ratio of a step to flow matching's (3F per row), rows split as the rule does."""
  settings = losses.resolve_options(name, options)
  n_diagonal = losses_base.num_diagonal(batch, settings['diagonal_fraction'])
  off, diagonal = passes(label, name, settings)
  return ((batch - n_diagonal) * off + n_diagonal * diagonal) / (3.0 * batch)


def unrolled_heun_map(teacher, num_steps: int):
  """The progressive rule's default teacher map (num_steps Heun steps of b per inner jump) with
  its loop unrolled, so that XLA's cost analysis counts every step (a loop body counts once)."""
  def teacher_map(s, t, x, labels):
    return samplers.integrate(lambda tt, xx: teacher(tt, xx, labels), x, s, t, num_steps, 'heun',
                              unroll=True)
  return teacher_map


def build_network(name: str, batch: int, num_classes: int, size: str = 'small', **overrides):
  """(apply, params, example_x) for a benchmark network."""
  if name == 'mlp':
    model = MLP(2, hidden=512, depth=4, num_classes=num_classes, rngs=nnx.Rngs(0))
    apply, params = functional(model)
    return apply, params, jax.random.normal(jax.random.PRNGKey(1), (batch, 2))
  from fmjax import models   # U-Net / DiT presets for benchmarks
  return models.build_for_benchmark(name, size, batch=batch, num_classes=num_classes, **overrides)


def perturb(params):
  # Zero-initialized output layers would make some residuals trivially zero.
  return jax.tree.map(lambda p: p + 0.01 * jnp.cos(jnp.arange(p.size).reshape(p.shape)).astype(p.dtype), params)


def rule_variants(num_classes: int):
  """(label, rule name, options) of every configuration in the table."""
  variants = [('flow_matching', 'flow_matching', {}),
              ('lsd', 'lsd', {}), ('lsd (primal grad)', 'lsd', {'grad_through_jvp': False}),
              ('esd', 'esd', {}), ('esd (primal grad)', 'esd', {'eulerian_gradient': 'primal'}),
              ('psd', 'psd', {}), ('psd (midpoint)', 'psd', {'intermediate': 'midpoint'}),
              ('shortcut', 'shortcut', {}),
              ('meanflow', 'meanflow', {}), ('imf', 'imf', {}),
              ('sct', 'sct', {}), ('ect', 'ect', {})]
  if num_classes:
    variants.append(('meanflow+cfg', 'meanflow', {'omega': 2.0, 'kappa': 0.5, 'null_label': num_classes,
                                                  'label_dropout': 0.1}))
  variants += [(name, name, {}) for name in TEACHER_RULES]
  return variants


def make_step(rule, optimizer):
  def step(params, opt_state, batch, key):
    (loss, _), grads = jax.value_and_grad(rule, has_aux=True)(params, batch, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return jax.jit(step, donate_argnums=(0, 1))


def stepper(compiled, params, opt_state, batch):
  """A call of the compiled step that carries its (donated) state on to the next call, with
  the key of call k PRNGKey(k)."""
  state = {'params': params, 'opt_state': opt_state, 'calls': 0}

  def call():
    key = jax.random.PRNGKey(state['calls'])
    state['params'], state['opt_state'], loss = compiled(state['params'], state['opt_state'], batch, key)
    state['calls'] += 1
    return loss
  return call


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', default='mlp')
  parser.add_argument('--batch', type=int, default=1024)
  parser.add_argument('--size', default='small', help="U-Net / DiT size: tiny, small or full")
  parser.add_argument('--attention', default='', help="U-Net / DiT attention: naive or blockwise")
  parser.add_argument('--num_classes', type=int, default=10)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--rules', default='', help='comma-separated labels to run (default: all)')
  parser.add_argument('--out', default='')
  args = parser.parse_args(argv)

  overrides = {'attention': args.attention} if args.attention else {}
  apply, net_params, x = build_network(args.model, args.batch, args.num_classes, args.size, **overrides)
  net_params = perturb(net_params)
  interp = interpolants.linear()
  flow_map = flow_maps.make('displacement', apply, interp)
  teacher_params = perturb(jax.tree.map(lambda p: p * 0.9, net_params))
  teacher = lambda t, xx, labels: apply(teacher_params, t, t, xx, labels)
  labels = jnp.arange(args.batch) % args.num_classes if args.num_classes else None
  batch = {'x1': x} if labels is None else {'x1': x, 'labels': labels}
  optimizer = optax.adam(1e-4)
  wanted = set(filter(None, args.rules.split(',')))

  entries = []   # (label, setting, flops, temp, analytic)
  calls = {}     # (label, setting) -> a call of its compiled step
  for label, name, options in rule_variants(args.num_classes):
    if wanted and label not in wanted and label != 'flow_matching':
      continue
    settings = [('mix', {})]
    if name != 'flow_matching':
      settings.insert(0, ('off', {'diagonal_fraction': 0.0}))
    for setting, extra in settings:
      rule_options = {**options, **extra}
      analytic = analytic_ratio(label, name, rule_options, args.batch)
      if name == 'progressive':   # the same teacher map as the default, counted step by step
        steps = losses.resolve_options(name, rule_options)['teacher_steps']
        rule_options['teacher_map'] = unrolled_heun_map(teacher, steps)
      rule = losses.make(name, flow_map, interp, teacher=teacher if name in TEACHER_RULES else None,
                         **rule_options)
      # A copy per entry: the step donates its params, which would free the shared arrays.
      params = jax.tree.map(jnp.copy, rule.init(net_params, jax.random.PRNGKey(0)))
      opt_state = optimizer.init(params)
      compiled, _ = benchmarking.compile(make_step(rule, optimizer), params, opt_state, batch,
                                         jax.random.PRNGKey(0))
      flops, temp = benchmarking.xla_cost(compiled)['flops'], benchmarking.temp_bytes(compiled)
      calls[label, setting] = stepper(compiled, params, opt_state, batch)
      entries.append((label, setting, flops, temp, analytic))
      print(f'compiled {label:18s} {setting}: {flops / 1e9:8.2f} GFLOP', file=sys.stderr, flush=True)

  # Interleaved, so drifts in machine load hit all alike; the first call of each is the warm-up.
  timings = benchmarking.interleaved(calls, repeats=args.repeats, warmup=1)
  base = next(e for e in entries if e[0] == 'flow_matching')
  base_flops, base_temp = base[2], base[3]
  base_time = timings[base[0], base[1]].median_s
  base_cpu = statistics.median(timings[base[0], base[1]].cpu_times)
  device = jax.devices()[0]
  # On a CPU backend the process's CPU time (all threads) is the work done, which other jobs
  # sharing the cores inflate less than the wall time; on an accelerator it is host time only.
  cpu_column = device.platform == 'cpu'
  title = (f'Model `{args.model}` ({args.size if args.model != "mlp" else "4x512"}), batch {args.batch}, '
           f'{device.platform} ({device.device_kind}), jax {jax.__version__}; flow matching: '
           f'{base_flops / 1e9:.2f} GFLOP, {base_time * 1e3:.1f} ms per step'
           + (f' ({base_cpu * 1e3:.0f} ms of CPU time)' if cpu_column else '')
           + f'; median of {args.repeats} interleaved repeats.')
  header = (['rule', 'rows', 'FLOP ratio (XLA)', 'analytic FLOP ratio', 'time ratio']
            + (['CPU time ratio'] if cpu_column else []) + ['temp memory ratio', 'reference FLOP ratio'])
  rows = []
  for label, setting, flops, temp, analytic in entries:
    timing = timings[label, setting]
    reference = REFERENCE.get(label, ('', ''))[0 if setting == 'off' else 1]
    which = 'all off-diagonal' if setting == 'off' else ('all diagonal' if label == 'flow_matching' else 'paper mix')
    cpu = [f'{statistics.median(timing.cpu_times) / base_cpu:.2f}'] if cpu_column else []
    rows.append([label, which, f'{flops / base_flops:.3f}', f'{analytic:.3f}',
                 f'{timing.median_s / base_time:.2f}'] + cpu + [f'{temp / base_temp:.2f}', reference])
  table = title + '\n\n' + benchmarking.markdown_table(header, rows)
  print(table)
  if args.out:
    benchmarking.write(args.out, table + '\n')


if __name__ == '__main__':
  main()
