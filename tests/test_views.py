"""One view of a photograph, whichever path makes it (issue 11, "One view"): the extractor's
decode, the store's pixels, the trainer's loader (hence `--targets online`), the contact sheet
and the full-size reads of `segment` and `eval` all show the upright picture a viewer shows."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from images import save_exif_jpeg, upright_picture, write_photos
from zeroseg.decode import decode_image, open_image
from zeroseg.errors import UserError
from zeroseg.geometry import training_view
from zeroseg.pipeline.runner import ExtractConfig, run_extract
from zeroseg.segment.datasets import LabelledDataset
from zeroseg.segment.neighbours import Neighbour, QueryResult, draw_contact_sheet
from zeroseg.stores.features import FeatureStore
from zeroseg.stores.schema import Status
from zeroseg.stores.views import row_views
from zeroseg.trainer.loader import Batches, StoreDataset

GRIDS, SIZE = (1, 2), 32
# Mean |difference| of a decoded view and the view of the picture the file was made from: JPEG
# loss stays under 1; a wrong orientation, alpha or bit depth is 30 or more.
CLOSE = 2.0


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Every photograph extracted twice by the tiny teacher: a store with pixels, one without."""
    root = tmp_path_factory.mktemp("photos")
    expect = write_photos(root / "imgs")
    (root / "imgs" / "broken.jpg").write_text("not a picture")  # a failed row among them
    stores = {}
    for pixels in (True, False):
        url = str(root / f"pixels_{pixels}.zarr")
        config = ExtractConfig(grids=GRIDS, view_size=SIZE, batch=50, chunk_images=8, pixels=pixels, workers=0)
        summary = run_extract(str(root / "imgs"), url, config, notify=quiet)
        assert (summary.ok, summary.failed) == (len(expect), 1), summary.reasons
        stores[pixels] = FeatureStore.open(url)
    return root, expect, stores[True], stores[False]


def names(store: FeatureStore) -> dict[int, str]:
    """Row -> file name of the rows that extracted."""
    ok = store.status() == Status.OK
    return {row: Path(p).name for row, p in enumerate(store.paths()) if ok[row]}


def far(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


def test_each_photograph_becomes_its_upright_picture(photos):
    _, expect, with_pixels, _ = photos
    wrong = {}
    for row, name in names(with_pixels).items():
        want = training_view(Image.fromarray(expect[name]), SIZE)
        if far(with_pixels.pixels[row], want) >= CLOSE:
            wrong[name] = round(far(with_pixels.pixels[row], want), 1)
        assert far(decode_image(with_pixels.paths()[row], SIZE, GRIDS).view, want) < CLOSE, name
    assert not wrong
    # the two stores embedded the same views: bit-identical features
    np.testing.assert_array_equal(with_pixels.features[:], photos[3].features[:])


def loader_views(store: FeatureStore) -> np.ndarray:
    """Every row's pixels as the trainer's loader hands them to the student (and to the online
    teacher of `--targets online`), in row order; zeros for the failed row."""
    dataset = StoreDataset(store, targets=False, buffer_chunks=8)
    try:
        with Batches(dataset, batch=dataset.plan.n_ok) as batches:
            batch = next(batches)
    finally:
        dataset.close()
    views = np.zeros((store.n_images, SIZE, SIZE, 3), np.uint8)
    views[batch["index"].numpy()] = batch["pixels"].numpy()
    return views


def test_the_loader_shows_the_student_what_the_teacher_embedded(photos):
    _, _, with_pixels, without = photos
    embedded = with_pixels.pixels[:]
    for store in (with_pixels, without):
        seen = loader_views(store)
        differ = [name for row, name in names(store).items() if not np.array_equal(seen[row], embedded[row])]
        assert differ == [], f"pixels {store.has_pixels}: the loader's view differs for {differ}"


def test_the_contact_sheet_draws_the_embedded_view(photos, tmp_path):
    _, _, with_pixels, without = photos
    rows = list(names(with_pixels))
    result = QueryResult(source="crops", query={"image": rows[0], "crop": 0}, k=len(rows))
    result.neighbours = [Neighbour(rank, row, 0, 1.0, "") for rank, row in enumerate(rows)]
    sheets = [np.asarray(Image.open(draw_contact_sheet(result, store, tmp_path / f"{store.has_pixels}.png")))
              for store in (with_pixels, without)]
    np.testing.assert_array_equal(sheets[0], sheets[1])


def test_row_views_are_the_embedded_views_in_any_order(photos):
    _, _, with_pixels, without = photos
    embedded = with_pixels.pixels[:]
    rows = list(names(with_pixels))
    picked = [rows[5], rows[0], rows[5], rows[-1]]  # any order, repeats allowed
    for store in (with_pixels, without):
        np.testing.assert_array_equal(row_views(store, picked), embedded[picked])
        after_failed = slice(rows[2], rows[2] + 4)  # rows 0, 1 and 3.. are ok: the failed one sorts third
        np.testing.assert_array_equal(row_views(store, after_failed), embedded[after_failed])
    assert row_views(without, []).shape == (0, SIZE, SIZE, 3)


def test_a_row_whose_file_is_gone_is_one_line_naming_it(photos, tmp_path):
    root, _, _, without = photos
    failed = [row for row in range(without.n_images) if row not in names(without)][0]
    with pytest.raises(UserError, match=f"cannot read image {failed} of .*broken.jpg.*: not an image") as e:
        row_views(without, [failed])
    assert "\n" not in str(e.value)


def test_full_size_reads_are_upright(photos, tmp_path):
    """`segment` and `eval` read whole pictures through open_image: the same rules, full size."""
    root, expect, _, _ = photos
    for name, picture in expect.items():
        image = np.asarray(open_image(str(root / "imgs" / name)))
        if name == "large.jpg":
            assert image.shape == (3000, 4000, 3)
        else:
            assert image.shape == picture.shape and far(image, picture) < CLOSE, name
    with pytest.raises(UserError, match="cannot read image .*broken.jpg: not an image"):
        open_image(str(root / "imgs" / "broken.jpg"))
    # an eval dataset of phone photos: image and label map agree in shape once upright
    save_exif_jpeg(tmp_path / "phone.jpg", upright_picture(), 6)
    Image.fromarray(np.zeros((48, 64), np.uint8), "L").save(tmp_path / "phone_mask.png")
    dataset = LabelledDataset("phone", ["background"], [tmp_path / "phone.jpg"], [tmp_path / "phone_mask.png"])
    image, mask = dataset.load(0)
    assert image.shape[:2] == mask.shape == (48, 64) and far(image, upright_picture()) < CLOSE
