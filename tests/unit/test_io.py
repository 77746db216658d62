"""Robust image / mask reading (``anomalens.data.io``) on awkward and broken files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalens.data import io as aio
from anomalens.data.io import ImageReadError, as_rgb_array, list_images, load_image, load_mask


def _save(arr: np.ndarray, path: Path, **kw: object) -> Path:
    Image.fromarray(arr).save(path, **kw)
    return path


def _jpeg_bytes(arr: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


# ---------------------------------------------------------------- list_images


def test_list_images_empty_folder(tmp_path: Path) -> None:
    assert list_images(tmp_path) == []


def test_list_images_ignores_non_images_and_hidden(tmp_path: Path) -> None:
    img = np.zeros((4, 4, 3), np.uint8)
    _save(img, tmp_path / "b.PNG")
    _save(img, tmp_path / "a.jpg")
    _save(img, tmp_path / ".hidden.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    _save(img, tmp_path / "sub" / "c.png")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG"]
    assert [p.name for p in list_images(tmp_path, recursive=True)] == ["a.jpg", "b.PNG", "c.png"]


def test_list_images_missing_or_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images(tmp_path / "nope")
    f = tmp_path / "x.txt"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match=r"x\.txt"):
        list_images(f)


# ---------------------------------------------------------------- broken files


def test_truncated_jpeg_names_the_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = _jpeg_bytes(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.jpg") as info:
        load_image(path)
    assert info.value.path == str(path)
    assert "truncated" in info.value.reason or "corrupt" in info.value.reason


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.png", b"", "empty"),
        ("garbage.png", b"this is not a png at all", "not a recognised image format"),
    ],
)
def test_unreadable_files(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason):
        load_image(path)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="is a folder"):
        load_image(tmp_path)


def test_pixel_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(np.zeros((10, 10), np.uint8), tmp_path / "big.png")
    monkeypatch.setattr(aio, "MAX_PIXELS", 50)
    with pytest.raises(ImageReadError, match="exceeds the limit of 50"):
        load_image(path)


# ---------------------------------------------------------------- modes


def test_16bit_png_is_scaled_by_its_range(tmp_path: Path) -> None:
    arr = np.array([[0, 128 * 257, 65535, 1000]], dtype=np.uint16)
    path = _save(arr, tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    out = load_image(path)
    assert out.shape == (1, 4, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255, 4])
    assert (out[..., 0] == out[..., 2]).all()


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[0, 0] = (255, 0, 0, 255)  # opaque red
    arr[0, 1] = (0, 0, 0, 0)  # fully transparent
    arr[1, :] = (0, 0, 255, 255)
    out = load_image(_save(arr, tmp_path / "rgba.png"))
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    np.testing.assert_array_equal(out[1, 1], [0, 0, 255])


def test_palette_and_greyscale(tmp_path: Path) -> None:
    pal = Image.new("P", (3, 1))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putdata([0, 1, 1])
    pal.save(tmp_path / "pal.png")
    out = load_image(tmp_path / "pal.png")
    np.testing.assert_array_equal(out[0], [[10, 20, 30], [200, 100, 50], [200, 100, 50]])
    grey = _save(np.array([[0, 77, 255]], np.uint8), tmp_path / "grey.png")
    out = load_image(grey)
    assert out.shape == (1, 3, 3)
    np.testing.assert_array_equal(out[0, :, 1], [0, 77, 255])
    assert (out[..., 0] == out[..., 2]).all()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((10, 20, 3), np.uint8)  # H=10, W=20; left half black, right half white
    arr[:, 10:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    path.write_bytes(_jpeg_bytes(arr, exif=exif.tobytes()))
    out = load_image(path)
    assert out.shape == (20, 10, 3)
    assert out[:8].mean() < 30 and out[12:].mean() > 225  # left half ends up on top


# ---------------------------------------------------------------- masks


def test_mask_binarised_and_checked(tmp_path: Path) -> None:
    arr = np.array([[0, 1, 2], [0, 0, 255]], np.uint8)  # VisA-style non-binary values
    path = _save(arr, tmp_path / "m.png")
    np.testing.assert_array_equal(load_mask(path), arr > 0)
    assert load_mask(path, (2, 3)).sum() == 3
    with pytest.raises(ImageReadError, match=r"m\.png.*does not match the image size 4x2"):
        load_mask(path, (2, 4))


def test_mask_rgb_and_none(tmp_path: Path) -> None:
    arr = np.zeros((2, 2, 3), np.uint8)
    arr[1, 1, 2] = 9
    m = load_mask(_save(arr, tmp_path / "rgb_mask.png"))
    assert m.shape == (2, 2) and m.sum() == 1 and m[1, 1]
    assert not load_mask(None, (3, 4)).any() and load_mask(None, (3, 4)).shape == (3, 4)
    with pytest.raises(ValueError, match="needs a shape"):
        load_mask(None)


# ---------------------------------------------------------------- arrays


def test_as_rgb_array_shapes() -> None:
    g = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert as_rgb_array(g).shape == (2, 3, 3)
    assert as_rgb_array(g[..., None]).shape == (2, 3, 3)
    rgba = np.zeros((2, 3, 4), np.uint8)
    assert as_rgb_array(rgba).shape == (2, 3, 3)
    f = np.full((1, 1, 3), 0.5, np.float32)
    assert as_rgb_array(f)[0, 0, 0] == 128
    with pytest.raises(ValueError, match="expected an"):
        as_rgb_array(np.zeros((2, 3, 5), np.uint8))
