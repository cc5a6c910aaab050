"""SD-VAE encode / decode throughput at float32 and bfloat16, and bfloat16's error against float32.

For each compute dtype this builds `fmjax.autoencoders.init(config, 0, dtype=...)` (random
PyTorch-default weights; the architecture, not the weights, sets the cost) and times the pure
`encode_fn` / `decode_fn` under `jax.jit` on inputs already on the device (no host transfer):
median of `--repeats` calls after one untimed call, each ended by `block_until_ready`. Beside
the times, XLA's FLOP count of the compiled program (`jax.jit(...).lower(...).compile()
.cost_analysis()`), per image. float32 runs at Precision.HIGHEST (as `Autoencoder` does), so a
GPU's float32 row is true float32, not TF32.

Error rows: the bfloat16 network (float32 weights, bfloat16 activations, GroupNorm statistics
and softmax in float32) against the float32 one on the same inputs: decode of the same latents
(N(0, 1), the decoder's input scale, not times scaling_factor) and the posterior mean of the same
images (uniform in [-1, 1]); max |bf16 - f32| / max |f32| and RMS(bf16 - f32) / RMS(f32).

  python benchmarks/vae_throughput.py --image_size 256 --batch 8 --out runs/vae.md   # accelerator
  python benchmarks/vae_throughput.py --image_size 128 --batch 2                      # CPU, full SD-VAE
  python benchmarks/vae_throughput.py --tiny                                          # CPU smoke run
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import autoencoders, benchmarking

TINY = dict(block_out_channels=(16, 32, 32, 32), norm_num_groups=8)


def measure(fn, params, x, repeats: int) -> dict:
  compiled, compile_s = benchmarking.compile(fn, params, x)
  out = jax.block_until_ready(compiled(params, x))   # the untimed call, kept for the error rows
  timing = benchmarking.time_calls(lambda: compiled(params, x), repeats=repeats, warmup=0)
  return dict(out=out, compile_s=compile_s, seconds=timing.median_s,
              flops=benchmarking.xla_cost(compiled)['flops'])


def relative(a, b) -> tuple[float, float]:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  d = a - b
  return float(np.abs(d).max() / np.abs(b).max()), float(np.sqrt(np.mean(d ** 2) / np.mean(b ** 2)))


def run(config, image_size: int, batch: int, repeats: int) -> tuple[list[dict], dict]:
  rows, outputs = [], {}
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (batch, image_size, image_size, config.in_channels)), jnp.float32)
  f = config.downsample_factor
  latents = jnp.asarray(rng.standard_normal((batch, image_size // f, image_size // f, config.latent_channels)),
                        jnp.float32)
  for dtype in ('float32', 'bfloat16'):
    vae = autoencoders.init(config, 0, dtype=dtype, batch_size=batch)
    for op, fn, x in (('decode', vae.decode_fn, latents), ('encode', lambda p, x: vae.encode_fn(p, x)[0], images)):
      m = measure(fn, vae.params, x, repeats)
      outputs[dtype, op] = np.asarray(m.pop('out'))
      rows.append(dict(dtype=dtype, op=op, **m))
      print(_row(rows[-1], batch), flush=True)
  errors = {op: relative(outputs['bfloat16', op], outputs['float32', op]) for op in ('decode', 'encode')}
  return rows, errors


COLUMNS = ('op', 'dtype', 'compile s', 'ms / batch', 'images/s', 'XLA GFLOP / image', 'GFLOP/s')


def _cells(r: dict, batch: int) -> list[str]:
  per_image = r['flops'] / batch / 1e9
  return [r['op'], r['dtype'], f"{r['compile_s']:.1f}", f"{1e3 * r['seconds']:.1f}",
          f"{batch / r['seconds']:.2f}", f'{per_image:.4g}', f"{r['flops'] / r['seconds'] / 1e9:.4g}"]


def _row(r: dict, batch: int) -> str:
  return benchmarking.markdown_row(_cells(r, batch))


def table(rows, errors, config, image_size, batch, repeats) -> str:
  device = jax.devices()[0]
  lines = [f'SD-VAE (AutoencoderKL) block_out_channels {list(config.block_out_channels)}, '
           f'layers_per_block {config.layers_per_block}, {image_size}x{image_size}x{config.in_channels} '
           f'images <-> {image_size // config.downsample_factor}x{image_size // config.downsample_factor}'
           f'x{config.latent_channels} latents, batch {batch}; {device.device_kind} ({device.platform}, '
           f'{jax.device_count()} device(s)), jax {jax.__version__}; median of {repeats} calls.',
           '', benchmarking.markdown_table(COLUMNS, [_cells(r, batch) for r in rows])]
  lines += ['', 'bfloat16 against float32, same weights and inputs:', '',
            benchmarking.markdown_table(
                ['output', 'max abs diff / max abs f32', 'RMS diff / RMS f32'],
                [[f'{op} ({"images" if op == "decode" else "posterior mean"})', f'{mx:.2e}', f'{rms:.2e}']
                 for op, (mx, rms) in errors.items()])]
  return '\n'.join(lines) + '\n'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--tiny', action='store_true', help=f'a small network {TINY} at 32x32')
  parser.add_argument('--image_size', type=int, default=0, help='default 256 (32 with --tiny)')
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--out', default='')
  args = parser.parse_args(argv)
  config = autoencoders.AutoencoderConfig.sd_vae(**(TINY if args.tiny else {}))
  image_size = args.image_size or (32 if args.tiny else 256)
  rows, errors = run(config, image_size, args.batch, args.repeats)
  text = table(rows, errors, config, image_size, args.batch, args.repeats)
  print(text)
  if args.out:
    benchmarking.write(args.out, text)


if __name__ == '__main__':
  main()
