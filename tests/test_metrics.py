import numpy as np
import pytest

from zeroseg.segment.metrics import IGNORE, Confusion


def test_iou_on_hand_made_masks():
    truth = np.array([[0, 0, 1, 1],
                      [0, 0, 1, 1],
                      [2, 2, 255, 255]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 1],
                     [0, 0, 1, 3],
                     [2, 0, 3, 0]], dtype=np.uint8)
    conf = Confusion(5)
    conf.add(truth, pred)
    iou = conf.iou()
    # class 0: tp 3; truth 4, predicted 4 (the ignored 255 pixels do not count) -> 3 / 5
    assert iou[0] == pytest.approx(3 / 5)
    # class 1: tp 3; truth 4, predicted 4 -> 3 / 5
    assert iou[1] == pytest.approx(3 / 5)
    # class 2: tp 1; truth 2, predicted 1 -> 1 / 2
    assert iou[2] == pytest.approx(1 / 2)
    # class 3: never true, predicted once outside the ignore band -> 0, and it counts
    assert iou[3] == 0.0
    # class 4: neither true nor predicted -> NaN, left out of the mean
    assert np.isnan(iou[4])
    assert conf.miou() == pytest.approx((3 / 5 + 3 / 5 + 1 / 2 + 0) / 4)
    assert conf.counts.sum() == 10  # 12 pixels, 2 ignored
    assert conf.pixel_accuracy() == pytest.approx(7 / 10)


def test_accumulates_over_images_and_perfect_is_one():
    conf = Confusion(3)
    a = np.array([[0, 1], [1, 2]], dtype=np.uint8)
    conf.add(a, a)
    conf.add(np.full((2, 2), IGNORE, np.uint8), np.zeros((2, 2), np.uint8))  # all ignored
    assert conf.counts.sum() == 4
    assert conf.miou() == 1.0
    # a class present in one image only keeps its IoU over the whole set
    conf.add(np.zeros((1, 2), np.uint8), np.array([[0, 2]], np.uint8))
    assert conf.iou()[2] == pytest.approx(1 / 2)


def test_rejects_bad_input():
    conf = Confusion(3)
    with pytest.raises(ValueError, match="shape"):
        conf.add(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="outside"):
        conf.add(np.full((2, 2), 3, np.uint8), np.zeros((2, 2), np.uint8))
    assert np.isnan(Confusion(2).miou())
