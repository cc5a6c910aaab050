"""Regenerate tests/data/vae_golden/: small diffusers AutoencoderKL folders and their outputs.

Needs torch and diffusers (not jax, not fmjax), in a separate environment:

  python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 diffusers==0.42.1 numpy safetensors
  /tmp/torchenv/bin/python tools/make_vae_golden.py            # writes tests/data/vae_golden/

Two networks of SD-VAE's architecture (diffusers' `AutoencoderKL`, Rombach et al. 2022, "High-
resolution image synthesis with latent diffusion models"), at widths small enough to keep the
folder under 2 MB:

  sdvae_small   4 levels (8, 16, 16, 32) like SD-VAE's 4 (3 downsamplings, factor 8),
                layers_per_block 2, 4 latent channels, norm_num_groups 4 (not diffusers'
                default 32), quant/post-quant convs, mid-block attention; 2 images 32 x 48 x 3.
  gray_noattn   2 levels (8, 16), layers_per_block 1, 2 latent channels, 1 image channel,
                no quant/post-quant conv, no mid-block attention, shift_factor 0.0 and a
                non-default scaling_factor; 2 images 20 x 28 x 1.

The weights are seeded PyTorch inits with every tensor moved off its init (GroupNorm gains != 1
and offsets != 0, conv and linear weights and biases perturbed), so no path is trivially the
identity or zero. In sdvae_small one log-variance channel of `quant_conv` is stretched so that
its pre-clamp values cross both of diffusers' clamp bounds (-30 and 20); the script asserts it.

Each `tests/data/vae_golden/<name>/` holds what `save_pretrained(..., safe_serialization=True)`
writes (config.json, diffusion_pytorch_model.safetensors) and golden.npz, all NHWC float32:
  images [2, H, W, C] in [-1, 1]; mean, std [2, H/f, W/f, latent]: the posterior's mean and std;
  decoded_mean [2, H, W, C]: decode(mean); latents [2, H/f, W/f, latent] ~ 2 N(0, 1) and
  decoded_latents: decode(latents) (latents as the decoder takes them: not times scaling_factor).
The reference outputs are diffusers' forward run in float64 on the saved float32 weights (the
network's exact function of those weights); the script prints how far diffusers' own float32
forward is from it, for scale.
"""

import argparse
import json
import os

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.utils import logging as diffusers_logging

CONFIGS = {
    'sdvae_small': dict(
        config=dict(in_channels=3, out_channels=3, block_out_channels=(8, 16, 16, 32),
                    down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
                    layers_per_block=2, latent_channels=4, norm_num_groups=4, act_fn='silu',
                    scaling_factor=0.18215, sample_size=48),
        image_shape=(32, 48), seed=1),
    'gray_noattn': dict(
        config=dict(in_channels=1, out_channels=1, block_out_channels=(8, 16),
                    down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,
                    layers_per_block=1, latent_channels=2, norm_num_groups=4, act_fn='silu',
                    scaling_factor=0.3611, shift_factor=0.0, use_quant_conv=False,
                    use_post_quant_conv=False, mid_block_add_attention=False),
        image_shape=(20, 28), seed=2),
}


def perturb(model: AutoencoderKL, gen: torch.Generator) -> None:
  """Moves every tensor away from its init: gains off 1, offsets and biases off 0, weights jittered."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=p.dtype)
      if p.ndim == 1 and ('norm' in name) and name.endswith('weight'):
        p.copy_(1.0 + 0.25 * noise)           # GroupNorm gain
      elif p.ndim == 1:
        p.add_(0.1 * noise)                   # GroupNorm offset, conv / linear bias
      else:
        p.add_(0.3 * p.std() * noise)         # conv / linear weight


def stretch_logvar(model: AutoencoderKL, images: torch.Tensor, channel: int) -> None:
  """Rescales one logvar row of quant_conv so its values span [-45, 35]: past both clamp bounds."""
  latent = model.config.latent_channels
  with torch.no_grad():
    lv = model.quant_conv(model.encoder(images))[:, latent + channel]
    lo, hi = float(lv.min()), float(lv.max())
    s = 80.0 / (hi - lo)
    row = latent + channel
    model.quant_conv.weight[row] *= s
    model.quant_conv.bias[row] = model.quant_conv.bias[row] * s + (-45.0 - lo * s)
    lv = model.quant_conv(model.encoder(images))[:, row]
    assert (lv > 20).any() and (lv < -30).any() and ((lv > -30) & (lv < 20)).any(), (lv.min(), lv.max())


def nhwc(x: torch.Tensor) -> np.ndarray:
  return x.permute(0, 2, 3, 1).contiguous().to(torch.float32).numpy()


def outputs(model: AutoencoderKL, images: torch.Tensor, latents: torch.Tensor) -> dict:
  with torch.no_grad():
    post = model.encode(images).latent_dist
    return dict(mean=nhwc(post.mean), std=nhwc(post.std),
                decoded_mean=nhwc(model.decode(post.mean).sample),
                decoded_latents=nhwc(model.decode(latents).sample))


def make(name: str, spec: dict, out_dir: str) -> None:
  torch.manual_seed(spec['seed'])
  model = AutoencoderKL(**spec['config']).eval()
  gen = torch.Generator().manual_seed(1000 + spec['seed'])
  perturb(model, gen)
  h, w = spec['image_shape']
  c, lat = spec['config']['in_channels'], spec['config']['latent_channels']
  f = 2 ** (len(spec['config']['block_out_channels']) - 1)
  rng = np.random.default_rng(spec['seed'])
  # Smooth structure plus noise, clipped to [-1, 1], as a VAE's inputs are.
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  smooth = np.stack([np.sin(6 * xx + k) * np.cos(4 * yy - k) for k in range(c)], -1)
  images = np.clip(smooth[None] * np.array([0.9, -0.7])[:, None, None, None]
                   + 0.3 * rng.standard_normal((2, h, w, c)), -1, 1).astype(np.float32)
  latents = (2.0 * rng.standard_normal((2, h // f, w // f, lat))).astype(np.float32)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  z = torch.from_numpy(latents).permute(0, 3, 1, 2).contiguous()
  if model.quant_conv is not None:
    stretch_logvar(model, x, channel=0)

  folder = os.path.join(out_dir, name)
  model.save_pretrained(folder, safe_serialization=True)
  # The reference: diffusers' forward in float64 on the weights exactly as saved (float32).
  reloaded = AutoencoderKL.from_pretrained(folder).eval()
  golden = outputs(reloaded.to(torch.float64), x.double(), z.double())
  f32 = outputs(AutoencoderKL.from_pretrained(folder).eval(), x, z)
  for key, ref in golden.items():
    err = np.abs(f32[key] - ref).max() / np.abs(ref).max()
    print(f'{name}: diffusers float32 vs float64 {key}: max|diff| / max|ref| = {err:.2e}')
  np.savez(os.path.join(folder, 'golden.npz'), images=images, latents=latents, **golden)
  with open(os.path.join(folder, 'config.json')) as fh:
    print(f'{name}: {json.load(fh)}')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'tests', 'data', 'vae_golden'))
  args = parser.parse_args(argv)
  torch.set_grad_enabled(False)
  diffusers_logging.set_verbosity_error()   # the float64 cast and missing-accelerate notices
  for name, spec in CONFIGS.items():
    make(name, spec, args.out)
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.out) for f in fs)
  print(f'{os.path.normpath(args.out)}: {total / 1e6:.2f} MB')


if __name__ == '__main__':
  main()
