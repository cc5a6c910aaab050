"""ImageNet-style image folders: a deterministic file list, ADM's center crop, random access.

A folder `root/<class>/<image>` (ImageNet's train/ layout) is listed in one fixed order:
class folders sorted by name get label ids 0..K-1, files sorted by name within a class.
Each image is decoded in full (a truncated or corrupt file is an error naming its path),
converted to RGB and center-cropped exactly as ADM's `center_crop_arr` does (Dhariwal &
Nichol 2021, openai/guided-diffusion `image_datasets.py`; the same crop DiT and MeanFlow use
for ImageNet 256): halve with a box filter while the short side is at least twice the
target, resize the short side to the target with bicubic, crop the center.

`ImageFolderSource` gives random access (`len`, `source[i]` -> {'image', 'label'}) for the
latent builder (fmjax.data.latents) and for reference statistics of an image folder.
"""

from __future__ import annotations

import os

import numpy as np

# Extensions read as images (compared lower-case). ImageNet's are .JPEG.
IMAGE_EXTENSIONS = ('.jpeg', '.jpg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm', '.pgm')


class UnreadableImageError(ValueError):
  """An image file that cannot be decoded in full; `path` names it, `reason` says why."""

  def __init__(self, path: str, reason: str):
    super().__init__(f'{path}: unreadable image ({reason})')
    self.path, self.reason = path, reason


def crop_name(resolution: int) -> str:
  """The name of the crop `read_image` applies, recorded with data built from it."""
  return f'adm_center_crop_{int(resolution)}'


def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
  """ADM's center crop of a PIL image to image_size x image_size, as a uint8 array.

  Box-filter halvings first (while the short side is >= 2 * image_size), then one bicubic
  resize of the short side to image_size (long side round(x * scale), Python's round), then
  the central square; guided-diffusion's `center_crop_arr` line for line.
  """
  from PIL import Image

  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
  arr = np.array(pil_image)
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def read_image(path: str, resolution: int | None) -> np.ndarray:
  """The image at `path` as RGB uint8 [resolution, resolution, 3] (ADM center crop), or at
  its own size when resolution is None. Raises UnreadableImageError naming the path."""
  from PIL import Image

  try:
    with Image.open(path) as image:
      # convert() decodes every pixel, so a truncated JPEG fails here and not later
      # (PIL's lazy open reads only the header).
      image = image.convert('RGB')
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
    # OSError covers PIL's UnidentifiedImageError and "image file is truncated".
    raise UnreadableImageError(path, f'{type(err).__name__}: {err}') from None
  if resolution is None:
    return np.asarray(image, np.uint8)
  return center_crop_arr(image, int(resolution))


def list_images(root: str) -> tuple[list[str], list[int], list[str]]:
  """(paths, labels, class_names) of the folder `root/<class>/<image>` in a fixed order.

  Classes sorted by folder name get labels 0..K-1; files sorted by name within a class;
  only IMAGE_EXTENSIONS (any case). Raises FileNotFoundError with what was expected when
  the folder is missing or holds no images.
  """
  root = os.path.abspath(os.path.expanduser(root))
  if not os.path.isdir(root):
    raise FileNotFoundError(f'Image folder {root} does not exist; expected root/<class>/<image> '
                            '(ImageNet train/ layout).')
  class_names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith('.'))
  paths, labels = [], []
  for label, name in enumerate(class_names):
    folder = os.path.join(root, name)
    files = sorted(e.name for e in os.scandir(folder)
                   if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
    paths.extend(os.path.join(folder, f) for f in files)
    labels.extend([label] * len(files))
  if not paths:
    raise FileNotFoundError(
        f'No images in {root}: expected one folder per class holding image files '
        f'({", ".join(IMAGE_EXTENSIONS)}), found {len(class_names)} class folders.')
  return paths, labels, class_names


class ImageFolderSource:
  """Random access to an image folder: `source[i]` = {'image': uint8 HWC, 'label': int}.

  Images are ADM center crops at `resolution` (RGB; their own size when None). An unreadable
  file raises UnreadableImageError with its path.
  """

  def __init__(self, root: str, resolution: int | None = 256):
    self.root = os.path.abspath(os.path.expanduser(root))
    self.resolution = resolution
    self.paths, self.labels, self.class_names = list_images(self.root)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    return {'image': read_image(self.paths[index], self.resolution), 'label': self.labels[index]}
