"""Zero-shot segmentation on a stand-in student: a test double with the student's interface
(config.image_size, segment(pixels) -> tokens, assignment) whose groups are known exactly, so the
masks the code paints can be checked pixel by pixel."""

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from zeroseg.segment import render
from zeroseg.segment.metrics import Confusion
from zeroseg.segment.zeroshot import (
    GridPredictor, StudentPredictor, TruthSegmentsPredictor, Vocabulary, calibrate_threshold, classify, object_crop,
)

# Three orthonormal directions: "red circle", "blue square", and one no class points at.
E = torch.eye(3)


@dataclass
class Segments:
    tokens: torch.Tensor
    assignment: torch.Tensor
    patches: torch.Tensor | None = None


@dataclass
class Config:
    image_size: int = 32
    patch_size: int = 8


class StandInStudent(torch.nn.Module):
    """Group 0 = patches whose mean red exceeds 128, group 1 = mean blue exceeds 128, group 2 =
    the rest; tokens are fixed directions with chosen lengths (cosine ignores length)."""

    def __init__(self, tokens: torch.Tensor):
        super().__init__()
        self.config = Config()
        self.tokens = tokens  # (3, D)

    def segment(self, pixels: torch.Tensor) -> Segments:
        b, s = pixels.shape[:2]
        assert pixels.dtype == torch.uint8 and s == self.config.image_size
        p = self.config.patch_size
        means = pixels.float().view(b, s // p, p, s // p, p, 3).mean((2, 4))  # (B, h, w, 3)
        assign = torch.full(means.shape[:3], 2)
        assign[means[..., 2] > 128] = 1
        assign[means[..., 0] > 128] = 0
        return Segments(self.tokens.expand(b, -1, -1), assign)


def test_vocabulary_maps_names_to_dataset_ids():
    vocab = Vocabulary.build(["blue square", "red circle"], E[[1, 0]].numpy() * 3, ["background", "red circle", "blue square"])
    assert vocab.class_ids.tolist() == [2, 1]
    np.testing.assert_allclose(vocab.embeddings.norm(dim=1), 1.0, atol=1e-6)
    labels, scores = classify(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]), vocab)
    assert labels.tolist() == [1, 2] and scores[0] == 1.0 and scores[1] == 0.0


def test_student_masks_shape_labels_and_threshold():
    vocab = Vocabulary.build(["red circle", "blue square"], E[:2].numpy())
    # token 2 sits at cosine 0.6 to "red circle": above a 0.5 threshold, below 0.7
    tokens = torch.stack([E[0] * 5, E[1], 0.6 * E[0] + 0.8 * E[2]])
    student = StandInStudent(tokens)
    image = np.zeros((48, 64, 3), np.uint8)  # not square, not the student's size
    image[:24, :32] = (230, 20, 20)  # red top-left quarter
    image[24:, 32:] = (20, 20, 230)  # blue bottom-right quarter
    raw = StudentPredictor(student, vocab).raw([image])[0]
    assert raw.labels.shape == (48, 64) and raw.scores.shape == (48, 64)
    strict = raw.mask(0.7)
    assert strict.dtype == np.uint8 and strict.shape == (48, 64)
    assert (strict[:24, :32] == 1).all() and (strict[24:, 32:] == 2).all()
    assert (strict[:24, 32:] == 0).all() and (strict[24:, :32] == 0).all()
    loose = raw.mask(0.5)  # the third group now passes as "red circle"
    assert (loose[:24, 32:] == 1).all() and (loose[24:, 32:] == 2).all()

    # calibration on this one image finds a threshold that keeps background background
    class One:
        name = "one"
        classes = ["background", "red circle", "blue square"]

        def __len__(self):
            return 1

        def load(self, i):
            truth = np.zeros((48, 64), np.uint8)
            truth[:24, :32], truth[24:, 32:] = 1, 2
            return image, truth

    t, miou = calibrate_threshold(StudentPredictor(student, vocab), One(), 3, candidates=np.array([0.5, 0.7, 0.9]), progress=False)
    assert (t, miou) == (0.7, 1.0)


def test_mask_png_is_palette_with_class_ids_and_overlay_has_legend(tmp_path):
    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 10:30] = 1
    mask[25:35, 40:55] = 7
    render.save_mask(mask, tmp_path / "m.png")
    back = Image.open(tmp_path / "m.png")
    assert back.mode == "P"
    np.testing.assert_array_equal(np.asarray(back), mask)
    assert back.getpalette()[3:6] == [128, 0, 0]  # VOC colour 1
    image = np.full((40, 60, 3), 200, np.uint8)
    ov = render.overlay(image, mask, {0: "background", 1: "red circle", 7: "blue square"})
    assert ov.width >= 60 and ov.height > 40 + 3 * 10  # three legend rows below the image
    body = np.asarray(ov)[:40, :60]
    assert (body[0, 0] == 200).all()  # background stays clear
    assert not (body[15, 20] == 200).all()  # class 1 is tinted


def test_grid_baseline_paints_cells(tiny_teacher):
    vocab = Vocabulary.build(["a", "b", "c"], np.random.default_rng(0).normal(size=(3, tiny_teacher.info.embed_dim)))
    images = [np.random.default_rng(i).integers(0, 255, (50, 70, 3), dtype=np.uint8) for i in range(2)]
    raws = GridPredictor(tiny_teacher, vocab, grid=4).raw(images)
    for raw in raws:
        assert raw.labels.shape == (50, 70)
        # every pixel of a cell shares its label and score: at most 16 distinct scores
        assert len(np.unique(raw.scores)) <= 16
        assert set(np.unique(raw.labels)) <= {1, 2, 3}
    conf = Confusion(4)
    conf.add(np.zeros((50, 70), np.uint8), raws[0].mask(2.0))  # cosine never reaches 2: all background
    assert conf.miou() == 1.0


def test_ceiling_labels_each_true_segment_once_and_keeps_background(tiny_teacher):
    vocab = Vocabulary.build(["a", "b", "c"], np.random.default_rng(0).normal(size=(3, tiny_teacher.info.embed_dim)))
    image = np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)
    truth = np.zeros((50, 70), np.uint8)
    truth[5:20, 10:30] = 1
    truth[30:45, 40:68] = 2  # reaches the right edge: its crop runs off the image
    truth[49, :] = 255  # ignored pixels are no segment
    predictor = TruthSegmentsPredictor(tiny_teacher, vocab)
    raw = predictor.raw([image], [truth])[0]
    mask = raw.mask(-1.0)  # every segment above threshold
    assert set(np.unique(mask[truth == 0])) == {0} and set(np.unique(mask[truth == 255])) == {0}
    for c in (1, 2):
        assert len(np.unique(mask[truth == c])) == 1 and mask[truth == c][0] in (1, 2, 3)
        assert len(np.unique(raw.scores[truth == c])) == 1
    assert set(np.unique(raw.mask(2.0))) == {0}  # cosine never reaches 2: all background
    # the crop is a square around the segment: segment 1 spans rows 5..19, cols 10..29, side 20 * 1.2
    crop = object_crop(image, truth == 1, 24)
    box = (8, 0, 32, 24)  # centre (20, 12.5), side 24 -> x 8..32, y 0.5..24.5 rounded
    want = np.asarray(Image.fromarray(image).crop(box).resize((24, 24), Image.BICUBIC))
    assert np.allclose(crop.permute(1, 2, 0).numpy() * 255, want, atol=1e-3)
