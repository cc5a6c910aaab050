"""Image folders: ADM's center crop against a plain rewrite with hand-computed sizes, the fixed
file order and labels, and unreadable (corrupt, truncated) files reported by path."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from fmjax.data import image_folder


def _picture(width, height, seed=0, mode='RGB'):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width]
  smooth = 127.5 + 90 * np.sin(xx[..., None] / (5.0 + np.arange(3)) + yy[..., None] / 7.0)
  pixels = (smooth + rng.normal(0, 20, (height, width, 3))).clip(0, 255).astype(np.uint8)
  return Image.fromarray(pixels).convert(mode)


# (source width x height, target, the box-filter halvings, the bicubic size, the crop box):
# sizes worked out by hand from ADM's rule, independently of the code under test.
CASES = [
    ((700, 300), 128, [(350, 150)], (299, 128), (85, 0, 213, 128)),        # 150 * (128 / 150) ...
    ((300, 700), 64, [(150, 350), (75, 175)], (64, 149), (0, 42, 64, 106)),
    ((256, 257), 256, [], (256, 257), (0, 0, 256, 256)),                  # scale 1: no resize
    ((100, 60), 64, [], (107, 64), (21, 0, 85, 64)),                      # upscaled, 106.67 -> 107
    ((513, 1030), 256, [(256, 515)], (256, 515), (0, 129, 256, 385)),
]


@pytest.mark.parametrize('size, target, halvings, resized, box', CASES)
def test_center_crop_is_adms(size, target, halvings, resized, box):
  image = _picture(*size)
  plain = image
  for step in halvings:
    plain = plain.resize(step, Image.BOX)
  plain = plain.resize(resized, Image.BICUBIC)
  expected = np.asarray(plain.crop(box))
  got = image_folder.center_crop_arr(image, target)
  assert got.shape == (target, target, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, expected)


def test_read_image_converts_to_rgb_then_crops(tmp_path):
  gray = _picture(90, 70, mode='L')
  gray.save(tmp_path / 'g.png')
  got = image_folder.read_image(str(tmp_path / 'g.png'), 32)
  expected = image_folder.center_crop_arr(gray.convert('RGB'), 32)
  np.testing.assert_array_equal(got, expected)
  assert got.shape == (32, 32, 3)
  assert image_folder.read_image(str(tmp_path / 'g.png'), None).shape == (70, 90, 3)
  assert image_folder.crop_name(256) == 'adm_center_crop_256'


def _folder(root):
  for name, files in {'b_class': ['2.JPEG', '10.jpg', 'notes.txt'], 'a_class': ['z.png', 'm.jpeg'],
                      'c_class': ['x.PNG'], '.hidden': ['h.png']}.items():
    (root / name).mkdir(parents=True)
    for i, f in enumerate(files):
      if f.endswith('.txt'):
        (root / name / f).write_text('not an image')
      else:
        _picture(40 + i, 30, seed=i).save(root / name / f, format='PNG' if f.lower().endswith('png') else 'JPEG')


def test_listing_order_and_labels(tmp_path):
  _folder(tmp_path)
  paths, labels, classes = image_folder.list_images(str(tmp_path))
  assert classes == ['a_class', 'b_class', 'c_class']
  rel = [p[len(str(tmp_path)) + 1:] for p in paths]
  assert rel == ['a_class/m.jpeg', 'a_class/z.png', 'b_class/10.jpg', 'b_class/2.JPEG', 'c_class/x.PNG']
  assert labels == [0, 0, 1, 1, 2]
  source = image_folder.ImageFolderSource(str(tmp_path), 16)
  assert len(source) == 5 and source.num_classes == 3
  item = source[3]
  assert item['label'] == 1 and item['image'].shape == (16, 16, 3) and item['image'].dtype == np.uint8
  np.testing.assert_array_equal(item['image'], image_folder.read_image(paths[3], 16))


def test_unreadable_files_are_reported_by_path(tmp_path):
  (tmp_path / 'k').mkdir()
  garbage = tmp_path / 'k' / 'garbage.JPEG'
  garbage.write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
  buffer = io.BytesIO()
  _picture(200, 200).save(buffer, format='JPEG', quality=95)
  truncated = tmp_path / 'k' / 'truncated.jpg'
  truncated.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])   # the header opens fine
  for path in (garbage, truncated):
    with pytest.raises(image_folder.UnreadableImageError, match=re.escape(str(path))) as err:
      image_folder.read_image(str(path), 64)
    assert err.value.path == str(path)
  source = image_folder.ImageFolderSource(str(tmp_path), 64)
  with pytest.raises(image_folder.UnreadableImageError, match='truncated'):
    source[1]


def test_missing_or_empty_folder_says_what_is_expected(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    image_folder.list_images(str(tmp_path / 'nothing'))
  (tmp_path / 'empty_class').mkdir()
  with pytest.raises(FileNotFoundError, match='No images'):
    image_folder.list_images(str(tmp_path))
