"""Pictures of samples: image grids and 2-D scatter panels as PNG files (matplotlib, imported
when a picture is drawn, so the training path does not load it)."""

from __future__ import annotations

import os

import numpy as np


def image_grid(images: np.ndarray, columns: int) -> np.ndarray:
  """[N, H, W, C] images in [-1, 1] -> one HWC uint8 grid, `columns` wide."""
  images = np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
  if images.ndim == 3:
    images = images[..., None]
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.zeros((rows * h, columns * w, c), np.uint8)
  for i in range(n):
    r, q = divmod(i, columns)
    grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = images[i]
  return grid[..., 0] if c == 1 else grid


def save_png(path: str, image: np.ndarray) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  os.makedirs(os.path.dirname(path), exist_ok=True)
  plt.imsave(path, image, cmap='gray' if image.ndim == 2 else None)


def scatter_png(path: str, panels: list[tuple[str, np.ndarray]], reference: np.ndarray | None = None
                ) -> np.ndarray:
  """Side-by-side 2-D scatter plots (first two coordinates); returns the picture as HWC uint8."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  os.makedirs(os.path.dirname(path), exist_ok=True)
  count = len(panels) + (reference is not None)
  fig, axes = plt.subplots(1, count, figsize=(3 * count, 3.2), squeeze=False)
  everything = [p for _, p in panels] + ([reference] if reference is not None else [])
  lo = np.percentile(np.concatenate(everything)[:, :2], 0.5, axis=0)
  hi = np.percentile(np.concatenate(everything)[:, :2], 99.5, axis=0)
  pad = 0.1 * (hi - lo)
  items = list(panels) + ([('target', reference)] if reference is not None else [])
  for ax, (title, pts) in zip(axes[0], items):
    ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5, color='k' if title == 'target' else 'C0')
    ax.set_title(title, fontsize=9)
    ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
    ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
    ax.set_xticks([])
    ax.set_yticks([])
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  fig.canvas.draw()
  picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return picture
