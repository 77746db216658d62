"""Robust image / mask reading (``anomalens.data.io``) on awkward and broken files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _bad_images import png_bytes_of_size
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


def test_links_and_fifos_are_named_not_waited_on(tmp_path: Path) -> None:
    import os

    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    os.mkfifo(tmp_path / "fifo.png")
    for name in ("dangling.png", "loop.png"):
        with pytest.raises(ImageReadError, match="symbolic link to nothing"):
            load_image(tmp_path / name)
    with pytest.raises(ImageReadError, match=r"fifo\.png: not a regular file"):
        load_image(tmp_path / "fifo.png")


def test_pixel_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(np.zeros((10, 10), np.uint8), tmp_path / "big.png")
    monkeypatch.setenv("ANOMALENS_MAX_PIXELS", "50")
    with pytest.raises(ImageReadError, match=r"big\.png.*exceeds the limit of 50"):
        load_image(path)
    monkeypatch.setenv("ANOMALENS_MAX_PIXELS", "ten")
    with pytest.raises(ValueError, match="ANOMALENS_MAX_PIXELS"):
        load_image(path)


def test_small_file_large_decoded_size_refused_from_header(tmp_path: Path) -> None:
    # issue 14: an ~80 KB PNG of 8000 x 8000 pixels used to be decoded (4.5 GB in predict)
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes_of_size(8000, 8000))
    assert path.stat().st_size < 200_000
    assert aio.max_pixels() < 8000 * 8000
    with pytest.raises(ImageReadError, match=r"bomb\.png.*8000x8000 = 64000000 decoded pixels"):
        load_image(path)
    with pytest.raises(ImageReadError, match="decoded pixels exceeds"):
        aio.image_size(path)
    with pytest.raises(ImageReadError, match=r"up\.png.*exceeds the limit of 100"):
        aio.load_image_bytes(path.read_bytes(), "up.png", limit=100)


def test_max_pixels_is_the_one_limit_even_above_pillows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pillow's own bomb check (an error beyond twice Image.MAX_IMAGE_PIXELS) used to cap it
    path = _save(np.full((50, 50), 7, np.uint8), tmp_path / "ok.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    monkeypatch.setenv("ANOMALENS_MAX_PIXELS", "10000")
    assert load_image(path).shape == (50, 50, 3)
    assert aio.image_size(path) == (50, 50)


def test_working_size_reduces_while_decoding(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    jpg = tmp_path / "big.jpg"
    jpg.write_bytes(_jpeg_bytes(arr))
    png = _save(arr, tmp_path / "big.png")
    pal = tmp_path / "pal.png"
    Image.fromarray(arr).convert("P").save(pal)
    assert load_image(jpg).shape == (300, 400, 3)  # default unchanged
    assert load_image(png).shape == (300, 400, 3)
    for p in (jpg, png, pal):
        out = load_image(p, working_size=64)
        assert 64 <= min(out.shape[:2]) < 128, (p.name, out.shape)
        assert out.shape[2] == 3 and out.dtype == np.uint8
    # reduced pixels are averages of the originals: the mean colour stays
    np.testing.assert_allclose(load_image(png, working_size=64).mean(), arr.mean(), atol=1.0)
    assert load_image(png, working_size=1000).shape == (300, 400, 3)  # never enlarged
    with pytest.raises(ValueError, match="working_size"):
        load_image(png, working_size=0)


def test_permission_denied_is_named(tmp_path: Path) -> None:
    import os

    path = _save(np.zeros((4, 4), np.uint8), tmp_path / "locked.png")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(ImageReadError, match="permission denied"):
            load_image(path)
    finally:
        path.chmod(0o644)


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
