import json
import os
import struct
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from images import png_header_only, tiff_raising_type_error, write_bad_and_odd, write_good
from zeroseg.errors import UserError
from zeroseg.decode import decode_image, to_rgb
from zeroseg.pipeline.runner import ExtractConfig, run_extract
from zeroseg.pipeline.reader import list_images

GRIDS = (1, 2)


def test_folder_is_recursive_sorted_and_filtered(tmp_path):
    write_good(tmp_path / "b", 2)
    write_good(tmp_path / "a" / "deep", 1)
    (tmp_path / "notes.txt").write_text("not listed")
    paths = list_images(str(tmp_path))
    assert paths == sorted(paths) and len(paths) == 3
    assert all(os.path.isabs(p) and p.endswith(".png") for p in paths)
    assert "/a/deep/" in paths[0]


def test_glob_manifest_and_duplicates(tmp_path):
    good = write_good(tmp_path / "imgs", 3)
    assert list_images(str(tmp_path / "imgs" / "*1.png")) == [str(good[1])]
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"# a comment\nimgs/good002.png\n\n{good[0]}\nimgs/good002.png\n")
    # a manifest keeps its order and its duplicates; relative lines are relative to it
    assert list_images(str(manifest)) == [str(good[2]), str(good[0]), str(good[2])]
    jsonl = tmp_path / "manifest.jsonl"
    jsonl.write_text("\n".join(json.dumps({"image": f"imgs/good00{i}.png", "split": "train"}) for i in (1, 0)))
    assert list_images(str(jsonl)) == [str(good[1]), str(good[0])]
    assert list_images(str(good[1])) == [str(good[1])]


@pytest.mark.parametrize("what, words", [("missing", "does not exist"), ("empty", "holds no image files"),
                                         ("glob", "matches no files"), ("manifest", "lists no images")])
def test_nothing_to_list_is_a_user_error(tmp_path, what, words):
    (tmp_path / "empty").mkdir()
    (tmp_path / "m.txt").write_text("# only a comment\n")
    arg = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "glob": tmp_path / "*.jpg",
           "manifest": tmp_path / "m.txt"}[what]
    with pytest.raises(UserError, match=words):
        list_images(str(arg))


def test_every_bad_input_is_a_reason_not_a_crash(tmp_path):
    expect = write_bad_and_odd(tmp_path)
    for name, outcome in expect.items():
        d = decode_image(str(tmp_path / name), 32, GRIDS)
        if outcome == "ok":
            assert d.view is not None and d.view.shape == (32, 32, 3) and d.view.dtype == np.uint8, name
            assert d.size == (40, 48) and d.error == "", name
        else:
            assert d.view is None and d.error.split(":")[0] == outcome, (name, d.error)
            assert "\n" not in d.error
    gone = decode_image(str(tmp_path / "vanished.png"), 32, GRIDS)
    assert gone.view is None and gone.error.startswith("missing")


def test_colour_conversions(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red under the alpha
    rgba[:, 4:, 3] = 255
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert (out[:, :4] == 255).all()  # transparent -> white, not the hidden red
    assert (out[:, 4:] == [200, 0, 0]).all()
    wide = np.array([[0, 257 * 100, 65535]], np.uint16)  # 16-bit grey: scaled, not clipped
    assert np.asarray(to_rgb(Image.fromarray(wide)))[0, :, 0].tolist() == [0, 100, 255]
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]


def test_tiny_rule_follows_the_finest_grid(tmp_path):
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "ten.png")
    assert decode_image(str(tmp_path / "ten.png"), 32, (1, 2)).view is not None  # 10 >= 4 * 2
    assert decode_image(str(tmp_path / "ten.png"), 32, (1, 2, 3)).error.startswith("too small")  # 10 < 12


# ---- bad input stays data: any exception, any size ----------------------------------------------


def test_an_unexpected_exception_type_is_a_failed_row(tmp_path):
    """Pillow raises TypeError on this TIFF (see images.tiff_raising_type_error): no rule lists
    that type, and the image must still end as a failed row with a one-line reason."""
    tiff_raising_type_error(tmp_path / "odd.tif")
    with pytest.raises(TypeError):
        Image.open(tmp_path / "odd.tif").load()  # the file really does make PIL raise it
    d = decode_image(str(tmp_path / "odd.tif"), 32, GRIDS)
    assert d.view is None and d.error.startswith("corrupt: ") and "\n" not in d.error, d.error


def extract_with_odd_file(tmp_path, workers: int):
    write_good(tmp_path / "imgs", 5)
    tiff_raising_type_error(tmp_path / "imgs" / "good002_odd.tif")  # the middle of the first chunk
    config = ExtractConfig(grids=GRIDS, view_size=32, batch=20, chunk_images=4, workers=workers)
    summary = run_extract(str(tmp_path / "imgs"), str(tmp_path / "s.zarr"), config, notify=lambda _: None)
    assert (summary.ok, summary.failed, summary.pending) == (5, 1, 0), summary
    assert not summary.lost_chunks and summary.reasons == {"corrupt": 1}


def test_an_unexpected_exception_fails_one_row_in_process(tmp_path):
    extract_with_odd_file(tmp_path, workers=0)


@pytest.mark.slow  # ~10 s: a Ray actor starts and builds its teacher
def test_an_unexpected_exception_fails_one_row_in_a_ray_worker(tmp_path, ray_session):
    """The exception happens inside the Ray actor (it decodes the real file), and the chunk ends
    written, not pending."""
    extract_with_odd_file(tmp_path, workers=1)


def huge_file(path, head: bytes) -> None:
    """`head` then zeros up to 2 GiB: a sparse file, cheap on disk, costly if read whole."""
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(2**31)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) claims width x height."""
    import io

    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


@pytest.mark.parametrize("kind", ["junk", "png", "jpeg"])
def test_a_2gb_file_is_refused_from_its_header(tmp_path, kind):
    """A 2 GiB file named .jpg (junk, or a header claiming 60000 x 60000 px) is refused without
    being read into memory: quickly, with a small peak of Python memory."""
    path = tmp_path / "huge.jpg"
    if kind == "png":
        png_header_only(tmp_path / "head.png", 60_000, 60_000)
        huge_file(path, (tmp_path / "head.png").read_bytes())
    else:
        huge_file(path, b"\x00junk, not an image" if kind == "junk" else jpeg_claiming(60_000, 60_000))
    tracemalloc.start()
    t0 = time.perf_counter()
    d = decode_image(str(path), 32, GRIDS)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert d.view is None and d.error.split(":")[0] == ("not an image" if kind == "junk" else "too large"), d.error
    assert peak < 100 * 2**20 and seconds < 2, (peak, seconds)
