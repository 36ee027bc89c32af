import json
import os

import numpy as np
import pytest
from PIL import Image

from images import write_bad_and_odd, write_good
from zeroseg.errors import UserError
from zeroseg.pipeline.decode import decode_image, to_rgb
from zeroseg.pipeline.sources import list_images

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
