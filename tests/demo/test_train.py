import struct
import zlib

import pytest
import torch

from autobatch.demo import UNet, run, shapes
from autobatch.demo.png import write_png
from autobatch.demo.train import foreground_iou


def test_shapes_are_deterministic_and_masked():
    images, masks = shapes(8, size=32, seed=3)
    again, again_masks = shapes(8, size=32, seed=3)
    assert images.shape == (8, 3, 32, 32) and masks.shape == (8, 32, 32)
    assert torch.equal(images, again) and torch.equal(masks, again_masks)
    assert set(masks.unique().tolist()) == {0, 1}
    assert 0.02 < masks.float().mean() < 0.5
    assert not torch.equal(shapes(8, size=32, seed=4)[0], images)


def test_unet_keeps_the_resolution():
    assert UNet(width=4)(torch.randn(2, 3, 32, 32)).shape == (2, 2, 32, 32)


def test_foreground_iou():
    masks = torch.tensor([[[0, 1], [1, 1]]])
    logits = torch.stack([1 - masks, masks], 1).float()
    assert foreground_iou(logits, masks) == 1.0
    logits[0, :, 0, 1] = torch.tensor([1.0, 0.0])
    assert foreground_iou(logits, masks) == 2 / 3


def test_png_is_a_valid_image(tmp_path):
    image = torch.zeros(3, 5, 7)
    image[0, 1, 2] = 1.0
    path = tmp_path / "x.png"
    write_png(path, image)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (7, 5)
    length = struct.unpack(">I", data[33:37])[0]
    rows = zlib.decompress(data[41:41 + length])
    assert len(rows) == 5 * (1 + 7 * 3)
    assert rows[1 * 22 + 1 + 2 * 3] == 255  # the red pixel at row 1, column 2


def test_a_short_demo_run_splits_and_learns(tmp_path):
    result = run(epochs=2, memory_budget="12MiB", train_size=96, size=32, out_dir=tmp_path, progress=False)
    assert len(result.plan.splits) > 1 and result.plan.source == "measured"
    assert result.losses[-1] < result.losses[0]
    assert 0.0 <= result.validation_iou <= 1.0
    assert result.picture.exists()


def test_the_picture_titles_its_columns():
    from autobatch.demo.lettering import lettering
    from autobatch.demo.train import TITLES, picture

    images, masks = shapes(4, 48, 0)
    logits = torch.stack([1 - masks.float(), masks.float()], 1)
    canvas = picture(images, masks, logits, zoom=3)  # tiles of 144 pixels: titles at twice the font's size
    band = canvas.shape[1] - 4 * (144 + 2)
    assert band > 14 and canvas[:, :band].min() == 0  # ink in the title band, above the first row of tiles
    for column, title in enumerate(TITLES):
        drawn = canvas[0, :band, column * 146:(column + 1) * 146] < 1
        assert drawn.sum() == lettering(title, scale=2).sum() > 0
    small = picture(*shapes(4, 10, 0), logits[:, :, :10, :10], zoom=1)  # too narrow for any title
    assert small[:, :band].min() == 1
    with pytest.raises(ValueError, match="no glyph for \\['!'\\]"):
        lettering("TRUE MASK!")
