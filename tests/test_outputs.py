"""Output folders: zeroseg writes only into folders it made (or found empty), refuses anyone
else's untouched, and prints user text literally (never as Rich markup)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from synthetic import synthetic_store
from zeroseg.cli import app
from zeroseg.errors import UserError
from zeroseg.outputs import MARKER, claim_output_dir, output_kind, write_atomic


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every folder (None) under `folder`, by relative path."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def foreign_folder(path: Path) -> Path:
    """A user's folder: a file, a sub-folder and a hidden file, none of them zeroseg's."""
    (path / "notes").mkdir(parents=True)
    (path / "README.txt").write_text("my thesis data, do not lose\n")
    (path / "notes" / "a.csv").write_text("x,y\n1,2\n")
    (path / ".hidden").write_bytes(b"\x00\x01")
    return path


@pytest.fixture(scope="module")
def store_url(tmp_path_factory, tiny_teacher):
    url = str(tmp_path_factory.mktemp("outputs") / "store.zarr")
    synthetic_store(url, tiny_teacher, 8)
    return url


def run_cli(args):
    result = CliRunner().invoke(app, args)
    return result


def assert_refused(result, folder: Path, before: dict):
    assert result.exit_code != 0
    assert isinstance(result.exception, UserError), result.output
    assert str(folder) in str(result.exception) and "\n" not in str(result.exception)
    assert snapshot(folder) == before  # byte for byte, and nothing added


# ---- the helper ------------------------------------------------------------------------------


def test_claim_creates_marks_resumes_and_refuses(tmp_path):
    new = tmp_path / "a" / "b"
    assert claim_output_dir(new, "index") is False and output_kind(new) == "index"
    assert json.loads((new / MARKER).read_text())["kind"] == "index"
    assert claim_output_dir(new, "index") is True  # ours: resumed
    with pytest.raises(UserError, match="holds a zeroseg index output, not a train output"):
        claim_output_dir(new, "train")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert claim_output_dir(empty, "scenes") is False and output_kind(empty) == "scenes"
    user = foreign_folder(tmp_path / "user")
    before = snapshot(user)
    with pytest.raises(UserError, match="not empty and zeroseg did not make it"):
        claim_output_dir(user, "train")
    assert snapshot(user) == before
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        claim_output_dir(a_file, "demo")


def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "r.json"
    write_atomic(path, "old")
    write_atomic(path, b"new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# ---- every verb that writes a folder refuses a user's folder, untouched --------------------------


def test_scenes_refuses_a_foreign_folder_and_reuses_its_own(tmp_path):
    user = foreign_folder(tmp_path / "user")
    before = snapshot(user)
    assert_refused(run_cli(["scenes", str(user), "--n", "2", "--size", "32"]), user, before)
    ours = tmp_path / "ours"
    assert run_cli(["scenes", str(ours), "--n", "2", "--size", "32"]).exit_code == 0
    assert output_kind(ours) == "scenes"
    assert run_cli(["scenes", str(ours), "--n", "3", "--size", "32"]).exit_code == 0  # ours: regenerated
    assert len((ours / "manifest.jsonl").read_text().splitlines()) == 3


def test_index_build_refuses_a_foreign_folder_and_rebuilds_its_own(tmp_path, store_url):
    user = foreign_folder(tmp_path / "user")
    before = snapshot(user)
    assert_refused(run_cli(["index", "build", store_url, "--out", str(user)]), user, before)
    ours = tmp_path / "idx"
    assert run_cli(["index", "build", store_url, "--out", str(ours)]).exit_code == 0
    assert output_kind(ours) == "index"
    assert run_cli(["index", "build", store_url, "--out", str(ours)]).exit_code == 0


def test_train_refuses_a_foreign_folder_and_another_kind_of_output(tmp_path, store_url):
    user = foreign_folder(tmp_path / "user")
    before = snapshot(user)
    args = ["train", store_url, "--preset", "tiny", "--steps", "1", "--batch", "2", "--threads", "1"]
    assert_refused(run_cli([*args, "--out", str(user)]), user, before)
    assert_refused(run_cli([*args, "--out", str(user), "--resume"]), user, before)
    index = tmp_path / "idx"
    claim_output_dir(index, "index")
    before = snapshot(index)
    result = run_cli([*args, "--out", str(index)])
    assert_refused(result, index, before)
    assert "index output, not a train output" in str(result.exception)


def test_ablate_refuses_a_foreign_folder(tmp_path, store_url):
    user = foreign_folder(tmp_path / "user")
    before = snapshot(user)
    result = run_cli(["ablate", store_url, "--out", str(user), "--eval", str(tmp_path), "--vocab", "v",
                      "--preset", "scales", "--trials-parallel", "0"])
    assert_refused(result, user, before)


def test_demo_refuses_a_foreign_folder(tmp_path):
    user = foreign_folder(tmp_path / "user")
    before = snapshot(user)
    assert_refused(run_cli(["demo", "--out", str(user), "--preset", "tiny"]), user, before)


# ---- Rich markup: user text prints literally ------------------------------------------------------


def test_errors_with_brackets_print_literally(tmp_path):
    import subprocess
    import sys

    odd = tmp_path / "data[red]" / "[bold]x"
    foreign_folder(odd)
    proc = subprocess.run([sys.executable, "-m", "zeroseg", "scenes", str(odd), "--n", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert str(odd) in proc.stderr, proc.stderr  # the brackets survive, nothing became a style
    assert len(proc.stderr.strip().splitlines()) == 1
