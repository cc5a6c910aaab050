"""bfloat16 against float32 for one DiT training step: loss and gradient, per rule (a table).

The same float32 parameters, batch and key; only the network's compute dtype differs. The
float32 reference runs its matmuls at 'highest' precision (on GPUs JAX's default lets float32
matmuls use TF32, which would blur the reference). Columns: the two losses, their relative
difference, and the relative difference of the gradients in global norm. tests/test_mixed_precision.py
asserts the same quantities on CPU at a tiny size (loss 1e-3, gradient 3e-2).

  python benchmarks/precision_check.py --out runs/precision.md   # DiT-B/2 width, 4 blocks, batch 32
  python benchmarks/precision_check.py --tiny                           # CPU smoke run
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from fmjax import benchmarking, flow_maps, interpolants, losses, models

SIZES = {
    'tiny': dict(image_size=8, in_channels=4, patch_size=2, hidden=32, depth=1, num_heads=2,
                 time_frequency_dim=32),
    # DiT-B/2's width, heads and tokens, 4 of its 12 blocks (compile time on the device run).
    'DiT-B/2-width': dict(image_size=32, in_channels=4, patch_size=2, hidden=768, depth=4, num_heads=12),
}
CASES = (('flow_matching', 'displacement', False), ('lsd', 'displacement', False),
         ('meanflow', 'meanflow', False), ('meanflow', 'meanflow', True))


def step_fn(graphdef, rule, parameterization, batch):
  apply = lambda p, s, t, x, labels=None: nnx.merge(graphdef, p)(s, t, x, labels)
  interp = interpolants.linear()
  loss = losses.make(rule, flow_maps.make(parameterization, apply, interp), interp,
                     **({} if rule == 'flow_matching' else {'diagonal_fraction': 0.25}))
  return loss, jax.jit(jax.value_and_grad(lambda p: loss(p, batch, jax.random.PRNGKey(3)), has_aux=True))


def unweighted(metrics) -> float:
  """The rule's unweighted loss on its off-diagonal rows (the diagonal's for flow matching): the
  weighted loss of MeanFlow's adaptive weight is ~1 / dims whatever the error, so it compares
  nothing."""
  return float(metrics.get('loss_offdiagonal', metrics.get('loss_diagonal', metrics['loss'])))


def relative(a, b) -> float:
  num = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return (num / sum(float(jnp.sum(y ** 2)) for y in jax.tree.leaves(b))) ** 0.5


def run(size: str, batch_size: int, num_classes: int = 10, out: str = '') -> list[dict]:
  """The rows of CASES; with `out`, the table so far is written after every row."""
  kw = dict(SIZES[size], num_classes=num_classes, time_conditioning='t_gap')
  shape = (batch_size, kw['image_size'], kw['image_size'], kw['in_channels'])
  batch = {'x1': jax.random.normal(jax.random.PRNGKey(1), shape), 'labels': jnp.arange(batch_size) % num_classes}
  rows = []
  for rule, parameterization, qk_norm in CASES:
    graphdef32, state = nnx.split(models.build('dit', qk_norm=qk_norm, **kw))
    # Off adaLN-Zero's zeros, so that every block carries gradient.
    params = jax.tree.map(lambda p: p + 0.02 * jnp.cos(jnp.arange(p.size).reshape(p.shape)).astype(p.dtype),
                          state.to_pure_dict())
    graphdef16, _ = nnx.split(models.abstract('dit', dtype=jnp.bfloat16, qk_norm=qk_norm, **kw))
    loss, f32 = step_fn(graphdef32, rule, parameterization, batch)
    _, bf16 = step_fn(graphdef16, rule, parameterization, batch)
    rule_params = loss.init(params, jax.random.PRNGKey(0))
    with jax.default_matmul_precision('highest'):
      (_, metrics32), grad32 = f32(rule_params)
    (_, metrics16), grad16 = bf16(rule_params)
    loss32, loss16 = unweighted(metrics32), unweighted(metrics16)
    rows.append(dict(rule=rule, qk_norm=qk_norm, loss32=loss32, loss16=loss16,
                     loss_rel=abs(loss16 / loss32 - 1), grad_rel=relative(grad16, grad32)))
    if out:
      benchmarking.write(out, table(rows, size, batch_size))
  return rows


def table(rows, size, batch_size) -> str:
  device = jax.devices()[0]
  lines = [f'bfloat16 vs float32 (highest-precision matmuls), DiT {size} width, batch {batch_size}, '
           f'{device.device_kind} ({device.platform}), jax {jax.__version__}; float32 parameters, same batch and key.',
           'Loss: unweighted, on the off-diagonal rows (flow matching: all rows); gradient: of the '
           'weighted loss the rule trains on, relative difference in global norm.',
           '', benchmarking.markdown_table(
               ['rule', 'qk_norm', 'loss f32', 'loss bf16', 'loss rel. diff', 'grad rel. diff'],
               [[r['rule'], r['qk_norm'], f"{r['loss32']:.6g}", f"{r['loss16']:.6g}", f"{r['loss_rel']:.2e}",
                 f"{r['grad_rel']:.2e}"] for r in rows])]
  return '\n'.join(lines) + '\n'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--tiny', action='store_true')
  parser.add_argument('--batch', type=int, default=0, help='default: 32 (16 with --tiny)')
  parser.add_argument('--out', default='')
  args = parser.parse_args(argv)
  size = 'tiny' if args.tiny else 'DiT-B/2-width'
  batch_size = args.batch or (16 if args.tiny else 32)
  print(table(run(size, batch_size, out=args.out), size, batch_size))


if __name__ == '__main__':
  main()
