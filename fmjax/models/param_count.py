"""Prints the parameter count of every network preset, as a markdown table.

    python -m fmjax.models.param_count

Counts come from shapes only (`nnx.eval_shape`), so even DiT-XL/2 costs nothing to count.
Class-conditional counts use ImageNet's 1000 classes for DiT and CIFAR-10's 10 for the U-Net.
"""

from __future__ import annotations

from fmjax import models

# (preset, overrides, what it is, the paper's count for comparison)
ROWS = (
    ('unet-cifar10', dict(num_classes=0), 'DDPM++ U-Net, CIFAR-10 32x32x3 (EDM / ECT / sCM)', '55.7M (EDM)'),
    ('unet-cifar10', dict(num_classes=10), 'same, class-conditional', ''),
    ('unet-mnist', dict(), 'U-Net, 28x28x1', ''),
    ('DiT-S/2', dict(num_classes=1000), 'DiT-S/2, 32x32x4 latents, 1000 classes', '33.0M'),
    ('DiT-B/2', dict(num_classes=1000), 'DiT-B/2, 32x32x4 latents, 1000 classes', '130M'),
    ('DiT-L/2', dict(num_classes=1000), 'DiT-L/2, 32x32x4 latents, 1000 classes', '458M'),
    ('DiT-XL/2', dict(num_classes=1000), 'DiT-XL/2, 32x32x4 latents, 1000 classes', '675M'),
    ('mlp-toy', dict(), 'MLP, 2-D toy data', ''),
    ('unet-tiny', dict(), 'tiny U-Net (tests)', ''),
    ('DiT-tiny', dict(), 'tiny DiT (tests)', ''),
)


def table() -> str:
  lines = ['| network | configuration | parameters | paper |', '|---|---|---:|---:|']
  for preset, overrides, what, paper in ROWS:
    n = models.param_count(preset, **overrides)
    extra = ', '.join(f'{k}={v}' for k, v in overrides.items())
    lines.append(f"| `{preset}`{' (' + extra + ')' if extra else ''} | {what} | {n:,} ({n / 1e6:.1f}M) | {paper} |")
  return '\n'.join(lines)


if __name__ == '__main__':
  print(table())
