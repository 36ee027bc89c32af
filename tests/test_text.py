import dataclasses

import numpy as np
import pytest
from typer.testing import CliRunner

from zeroseg.cli import app
from zeroseg.segment.text import TEMPLATES, cache_vocabulary, embed_classes, parse_classes
from zeroseg.stores.features import FeatureStore, StoreError
from zeroseg.stores.schema import StoreConfig


def make_store(path, info):
    return FeatureStore.create(str(path), StoreConfig(teacher=info, grids=(1, 2), view_size=32, chunk_images=4), ["a.png"])


def test_text_round_trip(tmp_path, tiny_teacher):
    url = str(tmp_path / "store.zarr")
    make_store(url, tiny_teacher.info)
    emb = cache_vocabulary(url, "toy", ["red circle", "blue square", "green triangle"])
    names, stored = FeatureStore.open(url).read_text("toy")
    assert names == ["red circle", "blue square", "green triangle"]
    np.testing.assert_allclose(stored, emb, atol=1e-6)
    # unit norm, and equal to the prompt ensemble computed directly from the same teacher
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(stored, embed_classes(tiny_teacher.encode_text, names), atol=1e-5)
    vocab = FeatureStore.open(url).group["text"]["toy"]
    assert list(vocab[vocab.attrs["current"]].attrs["templates"]) == list(TEMPLATES)
    # the ensemble is not just one template: it differs from the first template alone
    assert not np.allclose(stored, embed_classes(tiny_teacher.encode_text, names, TEMPLATES[:1]), atol=1e-3)


def test_text_of_another_teacher_is_refused(tmp_path, tiny_teacher):
    # The store says its features came from random:0 weights with another hash: the teacher that
    # would embed the text is not the one that made the features.
    other = dataclasses.replace(tiny_teacher.info, sha256="0" * 64)
    url = str(tmp_path / "store.zarr")
    make_store(url, other)
    with pytest.raises(StoreError, match="not the same teacher"):
        cache_vocabulary(url, "toy", ["red circle"])
    assert FeatureStore.open(url).vocabularies() == []  # nothing half-written

    result = CliRunner().invoke(app, ["text", url, "--vocab", "toy", "--classes", "red circle,blue square"])
    assert result.exit_code != 0
    assert isinstance(result.exception, StoreError)


def test_cli_text_mismatch_is_one_line_exit_2(tmp_path, tiny_teacher):
    import subprocess
    import sys

    other = dataclasses.replace(tiny_teacher.info, sha256="0" * 64)
    url = str(tmp_path / "store.zarr")
    make_store(url, other)
    proc = subprocess.run(
        [sys.executable, "-m", "zeroseg", "text", url, "--vocab", "toy", "--classes", "red circle"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    # open_clip logs a WARNING for a random init; the error itself is one line
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("error:") and "not the same teacher" in lines[0]


def test_parse_classes(tmp_path):
    assert parse_classes("red circle, blue square") == ["red circle", "blue square"]
    f = tmp_path / "classes.txt"
    f.write_text("# scene classes\nred circle\n\nblue square  # a comment\n")
    assert parse_classes(str(f)) == ["red circle", "blue square"]
    with pytest.raises(Exception, match="repeat"):
        parse_classes("a,a")
    with pytest.raises(Exception, match="does not exist"):
        parse_classes(str(tmp_path / "missing.txt"))
