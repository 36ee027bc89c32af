import numpy as np
import pytest
import torch

from zeroseg.geometry import box_pixels, cut_crops, grid_boxes, training_view
from zeroseg.pipeline.teacher import TeacherError, load_teacher
from PIL import Image


def test_random_teacher_is_deterministic_and_identified(tiny_teacher):
    other = load_teacher("zeroseg-tiny", "random", seed=0)
    assert other.info == tiny_teacher.info
    assert load_teacher("zeroseg-tiny", "random", seed=1).info.sha256 != tiny_teacher.info.sha256
    assert tiny_teacher.info.input_size == 64 and tiny_teacher.info.embed_dim == 128
    assert tiny_teacher.info.pretrained == "random:0"


def test_a_random_init_is_not_warned_about_but_other_warnings_still_are(caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        load_teacher("zeroseg-tiny", "random", seed=2)
        logging.warning("No pretrained weights loaded: a later warning of the same text still shows")
    assert [r.getMessage()[:28] for r in caplog.records] == ["No pretrained weights loaded"]


def test_teacher_loads_a_local_checkpoint(tmp_path, tiny_teacher):
    path = tmp_path / "w.pt"
    torch.save(tiny_teacher.model.state_dict(), path)
    loaded = load_teacher("zeroseg-tiny", str(path))
    assert loaded.info.sha256 == tiny_teacher.info.sha256
    assert loaded.info.pretrained == str(path.resolve())


def test_teacher_errors_are_one_line(tmp_path):
    with pytest.raises(TeacherError, match="unknown teacher architecture"):
        load_teacher("no-such-model")
    with pytest.raises(TeacherError, match="does not exist"):
        load_teacher("zeroseg-tiny", str(tmp_path / "missing.pt"))


def test_training_view_is_center_crop_of_shorter_side():
    img = np.zeros((100, 200, 3), dtype=np.uint8)
    img[:, 50:150] = 255  # the middle square of a wide image
    view = training_view(Image.fromarray(img), 50)
    assert view.shape == (50, 50, 3)
    assert view.mean() > 250  # only the white middle survives the center crop


def test_crops_cover_their_boxes(tiny_teacher):
    view = np.zeros((1, 60, 60, 3), dtype=np.uint8)
    view[0, :30, 30:] = 255  # top-right quadrant white
    boxes = grid_boxes((1, 2))
    crops = cut_crops(torch.from_numpy(view), boxes, 16)
    assert crops.shape == (5, 3, 16, 16)
    np.testing.assert_array_equal(box_pixels(boxes, 60)[2], [30, 0, 60, 30])
    assert crops[2].min() == pytest.approx(1.0) and crops[1].max() == 0.0  # cell 2 = top-right
    assert crops[0].mean() == pytest.approx(0.25, abs=0.01)
    with pytest.raises(ValueError, match="input size 64"):
        tiny_teacher.encode_images(crops)
    emb = tiny_teacher.embed_batches(cut_crops(torch.from_numpy(view), boxes, 64), batch=2)
    assert emb.shape == (5, 128) and np.isfinite(emb).all()
