import json
import os
import sys

import faiss
import numpy as np
import pytest
from PIL import Image

from zeroseg.segment.neighbours import BuildConfig, build_index, query_index, text_vector
from zeroseg.segment.render import OUTLINE, sheet_size
from zeroseg.stores.features import FeatureStore
from zeroseg.stores.schema import Status, StoreConfig, TeacherInfo
from zeroseg.stores.index import (
    INDEX_FILE,
    META_FILE,
    IndexMeta,
    NeighbourIndex,
    NeighbourIndexError,
    choose_kind,
    decode_ids,
    encode_ids,
    index_spec,
)

DIM = 32
TEACHER = TeacherInfo("zeroseg-tiny", "random:0", "ab" * 32, 64, (0.5,) * 3, (0.25,) * 3, DIM)


def make_store(path, n=20, teacher=TEACHER, features=None, pixels=True, failed=(), paths=None, seed=0):
    """A complete store of n images, grids 1,2 (5 crops), chunks of 8; `failed` images have
    status failed and zero features."""
    cfg = StoreConfig(teacher=teacher, grids=(1, 2), view_size=32, chunk_images=8, pixels=pixels)
    store = FeatureStore.create(str(path), cfg, paths or [f"img{i}.png" for i in range(n)])
    rng = np.random.default_rng(seed)
    if features is None:
        features = rng.standard_normal((n, cfg.n_crops, teacher.embed_dim)).astype(np.float32)
    views = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    status = np.full(n, Status.OK, dtype=np.uint8)
    for i in failed:
        status[i], features[i] = Status.FAILED, 0
    for c in range(store.n_chunks):
        sl = store.chunk_slice(c)
        m = sl.stop - sl.start
        store.write_chunk(c, features[sl], status[sl], [""] * m, np.full((m, 2), 32), views[sl])
    return store


def clustered(n, dim, clusters, seed):
    """Vectors around `clusters` centres, spread in an 8-d subspace (a low intrinsic dimension
    like real embeddings), plus a little isotropic noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = rng.standard_normal((8, dim)) / np.sqrt(dim)
    x = centres[rng.integers(0, clusters, n)] + 0.2 * rng.standard_normal((n, 8)) @ basis
    return (x + 0.02 * rng.standard_normal((n, dim)) / np.sqrt(dim)).astype(np.float32)


def run_cli(monkeypatch, capsys, *args):
    """Run `zeroseg ARGS` in-process -> (exit code, stdout, stderr)."""
    from zeroseg.cli import main

    monkeypatch.setattr(sys, "argv", ["zeroseg", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ids_round_trip():
    image, sub = np.array([0, 3, 1_000_000]), np.array([4, 0, 29])
    ids = encode_ids(image, sub, stride=30)
    np.testing.assert_array_equal(ids, [4, 90, 30_000_029])
    back = decode_ids(np.append(ids, -1), stride=30)
    np.testing.assert_array_equal(back[0], [0, 3, 1_000_000, -1])
    np.testing.assert_array_equal(back[1], [4, 0, 29, -1])


def test_auto_kind_by_size():
    assert choose_kind(99_999) == "flat"
    assert choose_kind(100_000) != "flat"
    assert index_spec("auto", 5_000, 512).factory == "IDMap,Flat"
    assert index_spec("auto", 1_000_000, 512).kind == choose_kind(1_000_000)
    with pytest.raises(NeighbourIndexError, match="unknown index kind"):
        index_spec("lsh", 10, 8)


def test_exact_search_finds_planted_neighbour(tmp_path):
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((20, 5, DIM)).astype(np.float32)
    feats[13, 4] = 3.0 * feats[2, 1] + 0.01 * rng.standard_normal(DIM)  # same direction: cosine ~1
    make_store(tmp_path / "s", features=feats, failed=(5,))
    meta = build_index(str(tmp_path / "s"), tmp_path / "ix", BuildConfig(kind="auto"))
    assert (meta.kind, meta.stride, meta.count) == ("flat", 5, 19 * 5)  # the failed image is left out

    result = query_index(tmp_path / "ix", image=2, crop=1, k=4)
    assert result.itself.rank == 0 and (result.itself.image, result.itself.sub) == (2, 1)
    best = result.neighbours[0]
    assert (best.image, best.sub, best.path) == (13, 4, "img13.png")
    assert best.score == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(best.box, [0.5, 0.5, 1.0, 1.0])  # crop 4: bottom-right of the 2x2 grid
    assert len(result.neighbours) == 4 and all(n.image != 5 for n in result.neighbours)
    scores = [n.score for n in result.neighbours]
    assert scores == sorted(scores, reverse=True)


def query_json(monkeypatch, capsys, *args) -> dict:
    code, out, err = run_cli(monkeypatch, capsys, "query", *args, "--json")
    assert code == 0, err
    return json.loads(out)


def test_k_neighbours_of_a_crop_the_query_shown_apart_and_not_counted(tmp_path, monkeypatch, capsys):
    make_store(tmp_path / "s")
    build_index(str(tmp_path / "s"), tmp_path / "ix", BuildConfig())
    report = query_json(monkeypatch, capsys, tmp_path / "ix", "--image", 2, "--crop", 1, "--k", 3)
    assert len(report["neighbours"]) == 3 and [n["rank"] for n in report["neighbours"]] == [1, 2, 3]
    assert all((n["image"], n["sub"]) != (2, 1) for n in report["neighbours"])
    assert report["query_counted"] is False and "not counted" in report["note"]
    assert (report["itself"]["image"], report["itself"]["sub"], report["itself"]["rank"]) == (2, 1, 0)

    code, out, err = run_cli(monkeypatch, capsys, "query", tmp_path / "ix", "--image", 2, "--crop", 1, "--k", 3)
    assert code == 0, err
    rows = [line.split("│")[1].strip() for line in out.splitlines() if line.count("│") >= 5]
    assert rows == ["query", "1", "2", "3"]  # the query, then exactly k neighbours
    assert "not counted" in " ".join(out.split())


def test_grids_subset_indexes_only_those_crops(tmp_path):
    make_store(tmp_path / "s")
    meta = build_index(str(tmp_path / "s"), tmp_path / "ix", BuildConfig(grids=(2,)))
    assert meta.count == 20 * 4 and meta.grids == [2]
    result = query_index(tmp_path / "ix", image=0, crop=0, k=30)
    assert {n.sub for n in result.neighbours} <= {1, 2, 3, 4}
    with pytest.raises(Exception, match="not 3"):
        build_index(str(tmp_path / "s"), tmp_path / "ix2", BuildConfig(grids=(3,)))


def test_ivf_build_reads_each_chunk_once(tmp_path, monkeypatch):
    # The IVF training sample is whole chunks; the add pass must reuse them, not read them (or, for
    # segments, run the student on them) a second time. (Tuning nprobe reads them once more.)
    from zeroseg.segment.neighbours import CropVectors

    make_store(tmp_path / "s", n=1600)  # 8000 crop vectors: trained on 40 * 128 of them
    reads = []
    chunk = CropVectors.chunk
    monkeypatch.setattr(CropVectors, "chunk", lambda self, i: reads.append(i) or chunk(self, i))
    meta = build_index(str(tmp_path / "s"), tmp_path / "ix", BuildConfig(kind="ivf-pq"))
    assert meta.kind == "ivf-pq" and meta.count == 1600 * 5
    fill, tuning = reads[:200], reads[200:]
    assert sorted(fill) == list(range(200))  # every chunk once
    assert fill[:3] != [0, 1, 2]  # the sample's chunks first, then the rest in order
    # then the tuning of nprobe: the chunks of its 200 queries (8 from each), one exact pass over all
    assert len(tuning) == 25 + 200 and tuning[25:] == list(range(200))
    index = NeighbourIndex.open(tmp_path / "ix")
    vector = FeatureStore.open(str(tmp_path / "s")).features[1234, 3]  # a vector of a sampled or unsampled chunk alike
    _, ids = index.search(np.asarray(vector, np.float32)[None], 1)
    assert tuple(int(v[0]) for v in decode_ids(ids[0], 5)) == (1234, 3)


@pytest.mark.parametrize("kind", ["hnsw", "ivf-pq", "ivf-pq-sq8"])
def test_approximate_recall_against_exact(kind):
    n, dim, k = 10_000, 32, 10
    both = clustered(n + 200, dim, 100, seed=0)
    data, queries = both[:n], both[n:]  # queries: fresh draws from the same clusters

    def build(spec):
        index = NeighbourIndex.new(spec, IndexMeta("test", spec.kind, spec.factory, {}, {}, dim, 1, 0, {}))
        if index.needs_training:
            index.train(data[:: max(1, n // spec.train_size)])
        index.add(data, np.arange(n))
        return index

    _, truth = build(index_spec("flat", n, dim)).search(queries, k)
    spec = index_spec(kind, n, dim)
    assert spec.kind == kind
    _, found = build(spec).search(queries, k)
    recall = np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)])
    assert recall >= 0.95, f"{kind} recall@10 {recall:.3f}"


@pytest.mark.parametrize("isotropic", [False, True])
def test_nprobe_is_the_fewest_lists_that_reach_the_recall_target(isotropic):
    """Clustered data finds its neighbours in the fewest lists tried; isotropic noise spreads them
    over many lists and beyond what the PQ shortlist can tell apart: the best measured is kept."""
    from zeroseg.stores.index import TUNE_NPROBES, TUNE_RECALL

    n, dim = 20_000, 32
    data = (np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32) if isotropic
            else clustered(n, dim, 100, seed=0))
    parts = np.array_split(np.arange(n), 40)
    chunk = lambda i: (parts[i].astype(np.int64) * 3, data[parts[i]])  # noqa: E731  ids need not be rows
    spec = index_spec("ivf-pq", n, dim)
    index = NeighbourIndex.new(spec, IndexMeta("test", spec.kind, spec.factory, {}, dict(spec.search_params), dim, 1, 0, {}))
    index.fill(chunk, len(parts), batch_vectors=4096, seed=0)
    index.tune_nprobe(chunk, len(parts), seed=0)
    tuned, chosen = index.meta.tuned, index.meta.search_params["nprobe"]
    measured = {int(p): r for p, r in tuned["recall_by_nprobe"].items()}
    assert tuned["queries"] == 200 and list(measured) == list(TUNE_NPROBES[: len(measured)])
    assert tuned["recall"] == measured[chosen] and faiss.extract_index_ivf(index.index).nprobe == chosen
    assert all(r < TUNE_RECALL for p, r in measured.items() if p < chosen)
    if isotropic:  # 8-byte PQ codes of isotropic 32-d noise cap recall below the target: the best one
        assert chosen > TUNE_NPROBES[0] and len(measured) == len(TUNE_NPROBES), measured
        assert max(measured.values()) == measured[chosen] < TUNE_RECALL
    else:
        assert chosen == TUNE_NPROBES[0] and measured[chosen] >= TUNE_RECALL, measured


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf-pq", "ivf-pq-sq8"])
def test_save_load_round_trip(tmp_path, kind):
    make_store(tmp_path / "s", n=40)
    meta = build_index(str(tmp_path / "s"), tmp_path / "ix", BuildConfig(kind=kind))
    assert (tmp_path / "ix" / INDEX_FILE).is_file()
    assert not list((tmp_path / "ix").glob("*.tmp"))
    loaded = NeighbourIndex.open(tmp_path / "ix")
    assert loaded.meta == meta
    assert loaded.meta.factory == index_spec(kind, 200, DIM).factory
    q = np.random.default_rng(3).standard_normal((4, DIM)).astype(np.float32)
    scores, ids = loaded.search(q, 5)
    scores2, ids2 = NeighbourIndex.open(tmp_path / "ix").search(q, 5)
    np.testing.assert_array_equal(ids, ids2)
    np.testing.assert_allclose(scores, scores2)
    assert ((ids >= 0) & (ids < 40 * 5)).all()


def test_refuses_another_store(tmp_path, monkeypatch, capsys):
    make_store(tmp_path / "a")
    build_index(str(tmp_path / "a"), tmp_path / "ix", BuildConfig())
    make_store(tmp_path / "b", paths=[f"other{i}.png" for i in range(20)])
    other_teacher = TeacherInfo(**{**vars(TEACHER), "sha256": "cd" * 32})
    make_store(tmp_path / "c", teacher=other_teacher)

    with pytest.raises(NeighbourIndexError, match="image paths"):
        query_index(tmp_path / "ix", image=0, crop=0, store_url=str(tmp_path / "b"))
    code, out, err = run_cli(monkeypatch, capsys, "query", tmp_path / "ix", "--image", 0, "--crop", 0,
                             "--store", tmp_path / "c")
    assert code == 2 and out == ""
    line = " ".join(err.split())  # rich may wrap a long line
    assert str(tmp_path / "a") in line and str(tmp_path / "c") in line
    assert "teacher abababababab vs cdcdcdcdcdcd" in line


def test_checkpoint_mismatch_names_both():
    meta = IndexMeta("segments", "flat", "IDMap,Flat", {}, {}, 8, 4, 0, {},
                     checkpoint={"path": "runs/a", "sha256": "11" * 32})
    index = NeighbourIndex.new(index_spec("flat", 0, 8), meta)
    index.check_checkpoint("runs/a/student.safetensors", "11" * 32)
    with pytest.raises(NeighbourIndexError, match=r"checkpoint runs/a \(111111111111\), given runs/b \(222222222222\)"):
        index.check_checkpoint("runs/b", "22" * 32)


def test_missing_or_corrupt_index_is_one_line(tmp_path, monkeypatch, capsys):
    make_store(tmp_path / "s")
    build_index(str(tmp_path / "s"), tmp_path / "ix", BuildConfig())
    args = ["query", tmp_path / "ix", "--image", 0, "--crop", 0]

    code, out, _ = run_cli(monkeypatch, capsys, *args, "--json")
    assert code == 0 and len(json.loads(out)["neighbours"]) == 10  # --k's default

    (tmp_path / "ix" / INDEX_FILE).write_bytes(b"not a faiss index")
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and "corrupt" in err and "Traceback" not in err

    (tmp_path / "ix" / META_FILE).unlink()
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 2 and "no neighbour index" in err and "meta.json missing" in " ".join(err.split())

    code, _, err = run_cli(monkeypatch, capsys, "query", tmp_path / "nowhere", "--text", "x")
    assert code == 2 and "no neighbour index" in err


def test_cli_build_and_contact_sheet(tmp_path, monkeypatch, capsys):
    make_store(tmp_path / "s")
    code, out, err = run_cli(monkeypatch, capsys, "index", "build", tmp_path / "s", "--out", tmp_path / "ix",
                             "--kind", "flat")
    assert code == 0, err
    assert "100 crops vectors, flat" in out

    sheet = tmp_path / "sheet.png"
    code, out, err = run_cli(monkeypatch, capsys, "query", tmp_path / "ix", "--image", 3, "--crop", 2,
                             "--k", 7, "--out", sheet)
    assert code == 0, err
    assert "img3.png" in out and f"contact sheet: {sheet}" in out
    with Image.open(sheet) as im:
        assert im.size == sheet_size(8)  # the query and 7 neighbours
        px = np.asarray(im.convert("RGB"))
    assert (px == OUTLINE).all(axis=-1).sum() > 100  # crop boxes are outlined


def test_contact_sheet_decodes_paths_without_pixels(tmp_path):
    """A store without pixels: the sheet decodes each image file into its training view."""
    paths = []
    for i in range(10):
        p = tmp_path / f"photo{i}.png"
        Image.fromarray(np.full((48, 64, 3), i * 20, dtype=np.uint8)).save(p)
        paths.append(str(p))
    store = make_store(tmp_path / "s", n=10, pixels=False, paths=paths)
    assert not store.has_pixels
    build_index(str(tmp_path / "s"), tmp_path / "ix", BuildConfig())
    result = query_index(tmp_path / "ix", image=4, crop=0, k=3, sheet=tmp_path / "q.png")
    with Image.open(result.sheet) as im:
        assert im.size == sheet_size(4)
        first = np.asarray(im.convert("RGB"))[100, 100]  # inside the query's tile: image 4's grey
    np.testing.assert_allclose(first, [80, 80, 80], atol=2)

    paths_gone = tmp_path / "photo7.png"
    paths_gone.unlink()
    from zeroseg.errors import UserError
    from zeroseg.stores.views import row_views

    with pytest.raises(UserError, match="cannot read image 7 .*photo7.png.*: missing"):
        row_views(store, [7])


def test_text_query_finds_planted_crops(tmp_path, tiny_teacher, monkeypatch, capsys):
    info = tiny_teacher.info
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((12, 5, info.embed_dim)).astype(np.float32)
    store = make_store(tmp_path / "s", n=12, teacher=info, features=feats.copy())
    red = text_vector(store, "red circle")
    planted = [(3, 2), (9, 0), (10, 4)]
    for image, crop in planted:
        feats[image, crop] = red * (1 + image) + 0.01 * rng.standard_normal(info.embed_dim)
    store = make_store(tmp_path / "t", n=12, teacher=info, features=feats)
    build_index(str(tmp_path / "t"), tmp_path / "ix", BuildConfig())

    result = query_index(tmp_path / "ix", text="red circle", k=5, sheet=tmp_path / "t.png")
    assert result.query == {"text": "red circle"} and result.itself is None
    assert {(n.image, n.sub) for n in result.neighbours[:3]} == set(planted)
    assert [n.rank for n in result.neighbours] == [1, 2, 3, 4, 5]
    with Image.open(result.sheet) as im:
        assert im.size == sheet_size(6)  # the text tile and 5 neighbours

    # --k 3: three neighbours, and the report says a text has no vector of its own to count
    report = query_json(monkeypatch, capsys, tmp_path / "ix", "--text", "red circle", "--k", 3)
    assert len(report["neighbours"]) == 3 and report["itself"] is None
    assert report["query_counted"] is False and "text" in report["note"]


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory):
    """A tiny student trained a few steps on a random store: (store url, run dir)."""
    from zeroseg.trainer.config import recipe
    from zeroseg.trainer.train import train

    root = tmp_path_factory.mktemp("student")
    make_store(root / "s", n=24)
    config = recipe("paper", "tiny", steps=4, batch=8, grids=(1, 2), checkpoint_every=4, log_every=2, workers=1,
                    prefetch=2)
    train(str(root / "s"), root / "run", config, progress=False)
    return str(root / "s"), root / "run"


def test_segments_index_maps_back_to_tokens(tiny_student, tmp_path, monkeypatch, capsys):
    from zeroseg.segment.neighbours import SegmentVectors
    from zeroseg.stores.features import FeatureStore
    from zeroseg.stores.views import row_views

    store_url, run = tiny_student
    code, out, err = run_cli(monkeypatch, capsys, "index", "build", store_url, "--source", "segments",
                             "--checkpoint", run, "--out", tmp_path / "ix")
    assert code == 0, err
    index = NeighbourIndex.open(tmp_path / "ix")
    meta = index.meta
    assert meta.source == "segments" and meta.checkpoint["sha256"] and meta.kind == "flat"

    # Every non-empty token of every image is in the index under image * K + token, and the
    # stored vector is the student's token (its own nearest neighbour, cosine 1).
    student = SegmentVectors(FeatureStore.open(store_url), str(run))
    tokens, assignment = student.segment(row_views(student.store, np.arange(24)))  # (24, K, D), (24, h, w)
    k_tokens = tokens.shape[1]
    assert meta.stride == k_tokens
    used = [(i, t) for i in range(24) for t in range(k_tokens) if (assignment[i] == t).any()]
    assert meta.count == len(used)
    image, token = used[len(used) // 2]
    scores, ids = index.search(tokens[image, token][None], 1)
    assert tuple(int(v[0]) for v in decode_ids(ids[0], k_tokens)) == (image, token)
    assert scores[0, 0] == pytest.approx(1.0, abs=1e-4)

    sheet = tmp_path / "seg.png"
    result = query_index(tmp_path / "ix", image=image, token=token, k=5, sheet=sheet)
    assert (result.itself.image, result.itself.sub) == (image, token)
    assert len(result.neighbours) == 5 and (image, token) not in {(n.image, n.sub) for n in result.neighbours}
    assert all((assignment[n.image] == n.sub).any() for n in result.rows())  # never an empty token
    with Image.open(sheet) as im:
        assert im.size == sheet_size(6)
        assert (np.asarray(im.convert("RGB")) == OUTLINE).all(axis=-1).sum() > 100  # masks outlined

    report = query_json(monkeypatch, capsys, tmp_path / "ix", "--image", image, "--token", token, "--k", 3)
    assert len(report["neighbours"]) == 3 and report["query_counted"] is False
    assert (report["itself"]["image"], report["itself"]["sub"]) == (image, token)
    assert all((n["image"], n["sub"]) != (image, token) for n in report["neighbours"])

    empty = [t for t in range(k_tokens) if not (assignment[0] == t).any()]
    if empty:
        with pytest.raises(Exception, match="empty segment"):
            query_index(tmp_path / "ix", image=0, token=empty[0])
    with pytest.raises(Exception, match="query it with --token"):
        query_index(tmp_path / "ix", image=0, crop=0)


def test_segments_index_refuses_another_checkpoint(tiny_student, tmp_path):
    from zeroseg.trainer.config import recipe
    from zeroseg.trainer.train import train

    store_url, run = tiny_student
    build_index(store_url, tmp_path / "ix", BuildConfig(source="segments", checkpoint=str(run)))
    other = tmp_path / "other"
    train(store_url, other, recipe("paper", "tiny", steps=1, batch=8, grids=(1, 2), seed=1, checkpoint_every=1,
                                   workers=1, prefetch=2), progress=False)
    with pytest.raises(NeighbourIndexError, match=r"built from checkpoint .*run.*, given .*other"):
        query_index(tmp_path / "ix", image=0, token=0, checkpoint=str(other))
    with pytest.raises(Exception, match="needs --checkpoint"):
        build_index(store_url, tmp_path / "ix2", BuildConfig(source="segments"))


# ---- a photograph that is not in the store ---------------------------------------------------


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A store extracted by the real job from 12 photographs (teacher zeroseg-tiny, random:0), and
    its flat crops index: (root, photos)."""
    from images import save_exif_jpeg, upright_picture, write_good
    from test_extract import SMALL, quiet
    from zeroseg.pipeline.runner import run_extract

    root = tmp_path_factory.mktemp("photos")
    photos = write_good(root / "imgs", 12, size=48)
    run_extract(str(root / "imgs"), str(root / "s"), SMALL, notify=quiet)
    build_index(str(root / "s"), root / "ix", BuildConfig(kind="flat"))
    save_exif_jpeg(root / "rotated.jpg", upright_picture(), orientation=6)  # not in the store
    return root, photos


def test_a_photo_in_the_store_finds_itself_through_the_extractors_view_and_teacher(extracted):
    root, photos = extracted
    result = query_index(root / "ix", image_file=str(photos[5]), crop=3, k=4)
    assert result.query == {"image_file": str(photos[5]), "crop": 3}
    assert (result.itself.rank, result.itself.image, result.itself.sub) == (0, -1, 3)
    best = result.neighbours[0]
    assert (best.image, best.sub) == (5, 3)  # the same crop of the same picture, embedded by `extract`
    assert best.score == pytest.approx(1.0, abs=2e-3)  # float16 storage, another batch: close, not equal
    assert [n.rank for n in result.neighbours] == [1, 2, 3, 4]


def test_a_photo_not_in_the_store_gets_neighbours_and_a_sheet(extracted, monkeypatch, capsys):
    root, _ = extracted
    sheet = root / "photo-sheet.png"
    report = query_json(monkeypatch, capsys, root / "ix", "--image-file", root / "rotated.jpg", "--k", 5,
                        "--out", sheet)
    assert report["query"] == {"image_file": str(root / "rotated.jpg"), "crop": 0}
    assert report["itself"]["image"] == -1 and len(report["neighbours"]) == 5
    assert all(n["image"] >= 0 for n in report["neighbours"])
    with Image.open(sheet) as im:
        assert im.size == sheet_size(6)  # the photograph and its 5 neighbours


def test_a_photo_query_that_cannot_be_answered_is_one_line(extracted, monkeypatch, capsys):
    root, _ = extracted
    (root / "junk.jpg").write_bytes(b"not a picture")
    for args, message in [
        (["--image-file", root / "junk.jpg"], "cannot read .*junk.jpg"),
        (["--image-file", root / "rotated.jpg", "--token", 0], "query a photograph with --crop"),
        (["--image-file", root / "rotated.jpg", "--crop", 99], "crop 99 out of range"),
        (["--image-file", root / "rotated.jpg", "--text", "x"], "--image-file queries alone"),
    ]:
        code, _, err = run_cli(monkeypatch, capsys, "query", root / "ix", *args)
        assert code == 2, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and __import__("re").search(message, lines[0]), err


def test_a_photo_queries_a_segments_index_with_its_largest_segment(tiny_student, tmp_path):
    from images import save_exif_jpeg, upright_picture
    from zeroseg.segment.neighbours import SegmentVectors, decode_photo
    from zeroseg.stores.features import FeatureStore

    store_url, run = tiny_student
    build_index(store_url, tmp_path / "ix", BuildConfig(source="segments", checkpoint=str(run)))
    save_exif_jpeg(tmp_path / "p.jpg", upright_picture(), orientation=3)
    result = query_index(tmp_path / "ix", image_file=str(tmp_path / "p.jpg"), k=3, sheet=tmp_path / "p.png")
    store = FeatureStore.open(store_url)
    _, assignment = SegmentVectors(store, str(run)).segment(decode_photo(store, str(tmp_path / "p.jpg")).view[None])
    largest = int(np.bincount(assignment[0].ravel()).argmax())
    assert result.query["token"] == largest and result.itself.sub == largest and result.itself.image == -1
    assert len(result.neighbours) == 3 and all(n.image >= 0 for n in result.neighbours)
    with Image.open(result.sheet) as im:
        assert im.size == sheet_size(4)
    with pytest.raises(Exception, match="query a photograph with --token"):
        query_index(tmp_path / "ix", image_file=str(tmp_path / "p.jpg"), crop=0)


# ---- re-ranking from the store (ivf-rabitq-store, ivf-pq-store) ----------------------------


@pytest.fixture(scope="module")
def clustered_store(tmp_path_factory):
    """800 images x 5 crops of clustered features (4000 vectors, 100 chunks of 8 images), with the
    two store-reranked kinds of index and an exact one built over it."""
    root = tmp_path_factory.mktemp("rerank")
    feats = clustered(800 * 5, DIM, 40, seed=4).reshape(800, 5, DIM)
    make_store(root / "s", n=800, features=feats, pixels=False)
    build_index(str(root / "s"), root / "store-ix", BuildConfig(kind="ivf-rabitq-store"))
    build_index(str(root / "s"), root / "pq-store-ix", BuildConfig(kind="ivf-pq-store"))
    build_index(str(root / "s"), root / "flat-ix", BuildConfig(kind="flat"))
    return root


@pytest.mark.parametrize("folder, kind", [("store-ix", "ivf-rabitq-store"), ("pq-store-ix", "ivf-pq-store")])
def test_store_reranked_finds_the_exact_top_k(clustered_store, folder, kind):
    from zeroseg.segment.neighbours import open_for_query

    index, store = open_for_query(clustered_store / folder, None)
    exact = NeighbourIndex.open(clustered_store / "flat-ix")
    assert index.meta.kind == kind and index.reranks_from_store
    queries = clustered(50, DIM, 40, seed=4)[:50] + 0.01  # near the store's clusters, not in it
    s_found, found = index.search(queries, 10)
    s_truth, truth = exact.search(queries, 10)
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert recall >= 0.99, recall
    both = found == truth  # where the same id is found, it has the exact score (read from the store)
    np.testing.assert_allclose(s_found[both], s_truth[both], atol=2e-3)  # float16 in the store


def compress_features(url) -> None:
    """Rewrite the store's crop features with the Blosc codec that stores had before features
    were stored raw: such a store cannot be mapped and is read chunk by chunk."""
    import zarr

    from zeroseg.stores.schema import COMPRESSED

    group = zarr.open_group(str(url), mode="r+")
    old = group["crops/features"]
    data = old[:]
    del group["crops/features"]
    group.create_array("crops/features", data=data, chunks=old.chunks, fill_value=0, compressors=COMPRESSED)


def test_a_new_store_keeps_features_raw_and_maps_them_in_place(clustered_store, monkeypatch):
    from zeroseg.stores.features import StoreArray
    from zeroseg.stores.index import StoreRows, store_rows

    store = FeatureStore.open(str(clustered_store / "s"))
    every = np.asarray(store.features[:], np.float32)
    files = store.features.raw_chunk_files()
    assert len(files) == 100 and store_rows(store) == "mapped"
    # a chunk file is the chunk's float16 rows, raw, then a 4-byte checksum
    chunk7 = np.fromfile(files[7], dtype="<f2", count=8 * 5 * DIM).reshape(8, 5, DIM)
    np.testing.assert_array_equal(chunk7, every[56:64].astype(np.float16))

    reads = []
    monkeypatch.setattr(StoreArray, "read_chunk", lambda self, c: reads.append(c))
    monkeypatch.setattr(StoreArray, "__getitem__", lambda self, key: reads.append(key))
    rows = StoreRows(store, stride=5)
    ids = np.random.default_rng(0).choice(4000, 300, replace=False)
    got = rows.rows(ids)
    image, crop = decode_ids(ids, 5)
    want = every[image, crop]
    np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-6, atol=1e-7)
    assert reads == [] and rows.chunk_reads == 0  # no chunk decoded: rows read in place


def test_mapped_rows_read_a_missing_chunk_as_zeros_and_refuse_a_short_one(tmp_path):
    from zeroseg.stores.index import NeighbourIndexError, map_rows

    feats = np.random.default_rng(1).standard_normal((20, 5, DIM)).astype(np.float32)
    store = make_store(tmp_path / "s", n=20, features=feats, pixels=False)  # chunks of 8: the last one partial
    files = store.features.raw_chunk_files()
    rows = map_rows(store.features)
    flat = np.arange(100)
    np.testing.assert_array_equal(rows.rows(flat), feats.reshape(100, DIM).astype(np.float16))  # the partial chunk too
    rows.close()

    os.remove(files[1])  # as if never written (all fill)
    rows = map_rows(store.features)
    got = rows.rows(flat).reshape(20, 5, DIM)
    assert (got[8:16] == 0).all() and (got[:8] == feats[:8].astype(np.float16)).all()
    rows.close()

    with open(files[2], "r+b") as f:
        f.truncate(100)
    with pytest.raises(NeighbourIndexError, match=f"c/2/0/0 is 100 bytes, a chunk takes {8 * 5 * DIM * 2}: the chunk "
                       "is damaged; run `zeroseg store verify --repair"):
        map_rows(store.features)


def test_a_compressed_store_is_reranked_chunk_by_chunk(clustered_store, tmp_path, monkeypatch):
    import shutil

    from zeroseg.segment.neighbours import open_for_query
    from zeroseg.stores.features import StoreArray
    from zeroseg.stores.index import StoreRows, store_rows

    shutil.copytree(clustered_store / "s", tmp_path / "s")
    compress_features(tmp_path / "s")
    store = FeatureStore.open(str(tmp_path / "s"))
    assert store.features.raw_chunk_files() is None and store_rows(store) == "chunks"
    every = np.asarray(store.features[:], np.float32)  # the truth, read before counting
    reads, row_reads = [], []
    read_chunk = StoreArray.read_chunk
    getitem = StoreArray.__getitem__
    monkeypatch.setattr(StoreArray, "read_chunk", lambda self, c: reads.append(c) or read_chunk(self, c))
    monkeypatch.setattr(StoreArray, "__getitem__", lambda self, key: row_reads.append(key) or getitem(self, key))
    rows = StoreRows(store, stride=5, cache_bytes=1)  # a cache of one chunk: every new chunk is read
    assert rows.mapped is None
    ids = np.random.default_rng(0).choice(4000, 300, replace=False)
    got = rows.rows(ids)
    image, crop = decode_ids(ids, 5)
    want = every[image, crop]
    np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-6)
    chunks = sorted(set((image // 8).tolist()))
    assert sorted(reads) == chunks and len(reads) < len(ids)  # one read per chunk touched, none per row
    assert row_reads == [] and rows.chunk_reads == len(chunks)

    reads.clear()
    rows = StoreRows(store, stride=5)  # the default cache holds them all: asked again, nothing is read
    rows.rows(ids), rows.rows(ids[::-1])
    assert sorted(reads) == chunks

    # an index over it answers as the one over the raw store does
    monkeypatch.undo()
    build_index(str(tmp_path / "s"), tmp_path / "ix", BuildConfig(kind="ivf-rabitq-store"))
    queries = clustered(20, DIM, 40, seed=4) + 0.01
    from_chunks, _ = open_for_query(tmp_path / "ix", None)
    in_place, _ = open_for_query(clustered_store / "store-ix", None)
    assert from_chunks.rows.mapped is None and in_place.rows.mapped is not None
    s1, i1 = from_chunks.search(queries, 10)
    s2, i2 = in_place.search(queries, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, atol=1e-6)


@pytest.mark.parametrize("folder", ["store-ix", "pq-store-ix"])
def test_store_reranked_index_file_holds_no_vectors(clustered_store, folder):
    from zeroseg.stores.index import index_footprint

    meta = json.loads((clustered_store / folder / META_FILE).read_text())
    size = (clustered_store / folder / INDEX_FILE).stat().st_size
    fp16_copy = meta["count"] * DIM * 2
    assert meta["factory"].startswith("IVF") and "Flat" not in meta["factory"] and "Refine" not in meta["factory"]
    assert size < fp16_copy / 1.5, (size, fp16_copy)  # codes and ids only; the vectors stay in the store
    # what `index build --dry-run` computes, short only of fast-scan's padding of each list to 32 codes
    computed = index_footprint(meta["kind"], meta["count"], DIM)["disk_bytes"]
    assert computed <= size <= 1.25 * computed, (size, computed)
    assert (clustered_store / "flat-ix" / INDEX_FILE).stat().st_size > meta["count"] * DIM * 4


def test_store_reranked_index_says_when_its_store_is_missing_or_changed(clustered_store, tmp_path, monkeypatch, capsys):
    import shutil

    store_copy = tmp_path / "s"
    shutil.copytree(clustered_store / "s", store_copy)
    build_index(str(store_copy), tmp_path / "ix", BuildConfig(kind="ivf-rabitq-store"))
    args = ["query", tmp_path / "ix", "--image", 3, "--crop", 1, "--k", 3]
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err

    status = FeatureStore.open(str(store_copy), mode="r+").array("images/status")
    status[8:16] = Status.PENDING  # a chunk marked pending (store verify --repair)
    code, out, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0 and "changed since the index was built" in err and len(err.strip().splitlines()) <= 3

    shutil.rmtree(store_copy)
    code, out, err = run_cli(monkeypatch, capsys, *args)
    line = " ".join(err.split())
    assert code == 2 and out == "" and f"no feature store at {store_copy}" in line and "Traceback" not in err


def test_cli_build_prints_the_lists_it_probes_and_the_recall_measured(clustered_store, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "index", "build", clustered_store / "s", "--out", tmp_path / "ix",
                             "--kind", "ivf-rabitq-store")
    assert code == 0, err
    meta = json.loads((tmp_path / "ix" / META_FILE).read_text())
    tuned, nprobe = meta["tuned"], meta["search_params"]["nprobe"]
    assert tuned["recall"] >= 0.97 and tuned["recall_by_nprobe"][str(nprobe)] == tuned["recall"]
    assert f"probes {nprobe} lists a query: recall@10 {tuned['recall']:.3f} on 200 of its own vectors" in out
    assert NeighbourIndex.open(tmp_path / "ix").index.nprobe == nprobe  # saved in the FAISS file too


def test_dry_run_prints_each_kind_and_writes_nothing(clustered_store, tmp_path, monkeypatch, capsys):
    before = sorted(p.relative_to(clustered_store) for p in clustered_store.rglob("*"))
    code, out, err = run_cli(monkeypatch, capsys, "index", "build", clustered_store / "s", "--out", tmp_path / "ix",
                             "--dry-run")
    assert code == 0, err
    assert not (tmp_path / "ix").exists() and list(tmp_path.iterdir()) == []
    assert sorted(p.relative_to(clustered_store) for p in clustered_store.rglob("*")) == before
    for kind in ("flat (auto)", "hnsw", "ivf-pq", "ivf-pq-sq8", "ivf-rabitq-store", "ivf-pq-store"):
        assert kind in out
    assert "4000 crops vectors" in out
    assert "row of the store's raw feature chunks, mapped" in out


def test_dry_run_says_a_compressed_store_is_read_chunk_by_chunk(clustered_store, tmp_path, monkeypatch, capsys):
    import shutil

    shutil.copytree(clustered_store / "s", tmp_path / "s")
    compress_features(tmp_path / "s")
    code, out, err = run_cli(monkeypatch, capsys, "index", "build", tmp_path / "s", "--out", tmp_path / "ix", "--dry-run")
    assert code == 0, err
    assert "features are compressed (or remote), so each candidate decodes a whole chunk" in out


def test_auto_reranks_from_a_mapped_store_and_from_a_compressed_one_when_ram_is_short():
    big = 1_000_000
    for ram in (64, 4, 2):  # the store's raw rows: re-ranked from it, whatever the RAM
        assert choose_kind(big, 512, store_rows="mapped", available_bytes=ram * 2**30) == "ivf-rabitq-store"
    assert choose_kind(big, 512, store_rows="chunks", available_bytes=64 * 2**30) == "ivf-pq"
    assert choose_kind(big, 512, store_rows="chunks", available_bytes=4 * 2**30) == "ivf-pq-sq8"  # 592 MB fits in 1 GiB
    assert choose_kind(big, 512, store_rows="chunks", available_bytes=2 * 2**30) == "ivf-rabitq-store"
    assert choose_kind(big, 512, store_rows=None, available_bytes=2 * 2**30) == "ivf-pq-sq8"  # segments: not in the store


def test_store_rerank_reads_more_candidates_as_the_collection_grows():
    from zeroseg.stores.index import RERANK_FACTOR, store_rerank_factor

    factors = [store_rerank_factor(n) for n in (10_000, 1_000_000, 2_000_000, 5_000_000, 40_000_000)]
    assert factors == sorted(factors) and factors[0] == factors[1] == 16 and factors[3] >= 48 and factors[-1] == 64
    assert index_spec("ivf-pq-store", 5_000_000, 512).search_params[RERANK_FACTOR] == factors[3]
    from zeroseg.stores.index import rabitq_rerank_factor

    factors = [rabitq_rerank_factor(n) for n in (10_000, 1_000_000, 5_000_000, 20_000_000, 500_000_000)]
    assert factors == [8, 8, 8, 16, 32]  # measured to 5M, grown as sqrt(n) beyond, capped
    assert index_spec("auto", 20_000_000, 512, store_rows="mapped").search_params[RERANK_FACTOR] == 16


def test_a_store_reranked_index_answers_the_same_after_its_store_grew(clustered_store, tmp_path, capsys):
    """Rows appended to the store (pending, no chunk files yet; the old last chunk now followed by
    new ones) change nothing the index reads: the same neighbours, and the stale warning."""
    import shutil

    from zeroseg.segment.neighbours import open_for_query

    shutil.copytree(clustered_store / "s", tmp_path / "s")
    build_index(str(tmp_path / "s"), tmp_path / "ix", BuildConfig(kind="ivf-rabitq-store"))
    queries = clustered(20, DIM, 40, seed=4) + 0.01
    index, _ = open_for_query(tmp_path / "ix", None)
    before = index.search(queries, 10)
    FeatureStore.open(str(tmp_path / "s"), mode="r+").append([f"new{i}.png" for i in range(20)])
    capsys.readouterr()
    index, store = open_for_query(tmp_path / "ix", None)
    assert "stale" in capsys.readouterr().err and store.n_images == 820 and index.rows.mapped is not None
    after = index.search(queries, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])


def test_maps_the_system_refuses_fall_back_to_chunk_reads_with_a_warning(clustered_store, monkeypatch, capsys):
    from zeroseg.segment.neighbours import open_for_query
    from zeroseg.stores import mapped

    queries = clustered(10, DIM, 40, seed=4) + 0.01
    in_place, _ = open_for_query(clustered_store / "store-ix", None)
    want = in_place.search(queries, 10)

    def refused(self, *args):
        raise OSError(12, "mmap of the reserved span failed: Cannot allocate memory")

    monkeypatch.setattr(mapped.MappedRows, "__init__", refused)
    capsys.readouterr()
    index, _ = open_for_query(clustered_store / "store-ix", None)
    err = " ".join(capsys.readouterr().err.split())
    assert index.rows.mapped is None and "could not be mapped" in err and "Cannot allocate memory" in err
    got = index.search(queries, 10)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)
