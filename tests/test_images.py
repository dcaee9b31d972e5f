"""Reference images: every PIL mode ends as 8-bit RGB; broken files are one-line errors."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from psr.core.images import fit_size, kontext_size, load_image, postprocess, reference_fit_size, to_pil, to_tensor
from psr.errors import UserError


def _save(tmp_path, image, name="x.png", **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


def test_rgba_is_flattened_onto_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 128))
    out = load_image(_save(tmp_path, rgba))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert out.getpixel((2, 2)) == (255, 255, 255)
    r, g, b = out.getpixel((1, 0))
    assert abs(r - 127) <= 1 and abs(g - 127) <= 1 and b == 255


def test_grayscale_and_16_bit(tmp_path):
    assert load_image(_save(tmp_path, Image.new("L", (3, 3), 77))).getpixel((1, 1)) == (77, 77, 77)
    sixteen = Image.fromarray(np.full((3, 3), 65535 // 2, dtype=np.uint16))
    out = load_image(_save(tmp_path, sixteen, "s.png"))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (127, 127, 127)  # 32767/65535·255 = 127.498


def test_palette_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (2, 2), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert load_image(_save(tmp_path, pal)).getpixel((0, 0)) == (10, 200, 30)
    transparent = _save(tmp_path, pal, "t.png", transparency=1)
    assert load_image(transparent).getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (4, 2), (0, 0, 0))
    image.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "o.jpg"
    image.save(path, exif=exif, quality=100)
    out = load_image(path)
    assert out.size == (2, 4)
    assert out.getpixel((1, 0))[0] > 200  # top-left moved to top-right


def test_cmyk_and_jpeg(tmp_path):
    out = load_image(_save(tmp_path, Image.new("CMYK", (2, 2), (0, 255, 255, 0)), "c.jpg"))
    assert out.mode == "RGB" and out.getpixel((0, 0))[0] > 200


def _bad_file(folder, kind):
    path = folder / f"{kind}.png"
    if kind == "missing":
        return path
    if kind == "directory":
        return folder
    content = {"empty": b"", "text": b"not an image", "truncated": _png_bytes()[:60]}[kind]
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such file"),
    ("directory", "is a directory"),
    ("empty", "the file is empty (0 bytes)"),
    ("text", "not an image PIL can read"),
    ("truncated", "the image is damaged"),
])
def test_bad_files_raise_one_line_user_errors(tmp_path, kind, message):
    with pytest.raises(UserError) as err:
        load_image(_bad_file(tmp_path, kind))
    assert message in str(err.value) and "\n" not in str(err.value)


def _special_file(folder, kind):
    import os

    if kind == "fifo":
        path = folder / "fifo.png"
        os.mkfifo(path)
        return path
    if kind == "device":
        if not Path("/dev/zero").exists():
            pytest.skip("no /dev/zero here")
        return Path("/dev/zero")
    path = folder / "huge.png"
    with open(path, "wb") as f:  # sparse: 300 MiB on paper, no space on disk
        f.write(_png_bytes())
        f.truncate(300 * 2**20)
    return path


@pytest.mark.parametrize("kind, message", [
    ("fifo", "not a regular file"),       # opening it would wait for a writer forever
    ("device", "not a regular file"),     # /dev/zero would be read without end
    ("huge", "300 MiB, more than the 256 MiB an image may have"),
])
def test_special_and_huge_files_are_refused_before_they_are_read(tmp_path, kind, message):
    with pytest.raises(UserError) as err:
        load_image(_special_file(tmp_path, kind))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_zero_size_image_is_refused(tmp_path, monkeypatch):
    # PIL can neither write nor decode a 0-pixel file, so a decoder that yields one is simulated.
    path = _save(tmp_path, Image.new("RGB", (2, 2)))
    monkeypatch.setattr(Image, "open", lambda f: Image.new("RGB", (0, 5)))
    with pytest.raises(UserError, match="zero size"):
        load_image(path)


def _png_bytes():
    import io

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_tensor_round_trip_is_exact(rgb_image):
    image = rgb_image(16, 8)
    back = to_pil(to_tensor(image))[0]
    assert np.array_equal(np.asarray(back), np.asarray(image))


@pytest.mark.parametrize("size, multiple, expected", [
    ((100, 100), 16, (1024, 1024)),  # square: Kontext's 1024 x 1024
    ((300, 200), 16, (1248, 832)),  # 3:2 exactly
    ((200, 300), 16, (832, 1248)),
    # The ratio is read after flooring to the stride: 32 x 16 is 2.0 (1456 x 720), while
    # 40 x 17 itself is 2.35 (1568 x 672).
    ((40, 17), 16, (1456, 720)),
    # The chosen resolution is floored too: 1104 x 944 is not a multiple of 32.
    ((1104, 944), 32, (1088, 928)),
    # Less than one stride tall (the pipeline divides by zero): the image's own ratio.
    ((100, 10), 16, (1568, 672)),
    ((10, 100), 16, (672, 1568)),  # less than one stride wide: ratio 0, the tallest entry
])
def test_kontext_resize_rule(size, multiple, expected):
    assert kontext_size(*size, multiple) == expected
    assert reference_fit_size(*size, "kontext", 512, multiple) == expected  # reference_size unused


def test_longest_rule_is_fit_size_and_unknown_rules_are_refused():
    assert reference_fit_size(300, 200, "longest", 64, 8) == fit_size(300, 200, 64, 8) == (64, 40)
    with pytest.raises(ValueError, match="unknown reference resize rule 'nearest'"):
        reference_fit_size(300, 200, "nearest", 64, 8)


def test_postprocess_follows_diffusers_image_processor():
    import torch
    from diffusers.image_processor import VaeImageProcessor

    pixels = torch.linspace(-1.2, 1.2, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)  # past both ends: clamped
    processor = VaeImageProcessor()
    pt, arr, pil = (postprocess(pixels, kind) for kind in ("pt", "np", "pil"))
    assert pt.shape == (2, 3, 4, 5) and pt.dtype == torch.float32 and pt.min() == 0 and pt.max() == 1
    assert torch.equal(pt, processor.postprocess(pixels, output_type="pt"))
    assert arr.shape == (2, 4, 5, 3) and arr.dtype == np.float32
    assert np.array_equal(arr, processor.postprocess(pixels, output_type="np"))
    theirs = processor.postprocess(pixels, output_type="pil")
    assert [np.asarray(a).tolist() for a in pil] == [np.asarray(b).tolist() for b in theirs]
    with pytest.raises(UserError, match=r"^output_type 'latent': must be one of 'pil', 'np', 'pt'$"):
        postprocess(pixels, "latent")
