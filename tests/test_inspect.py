import json

import numpy as np
import pytest

from images import write_bad_and_odd, write_good
from test_extract import SMALL, quiet, zeroseg
from zeroseg.pipeline.runner import run_extract
from zeroseg.stores.features import FeatureStore
from zeroseg.stores.inspect import store_info, verify_store


@pytest.fixture
def store_url(tmp_path):
    write_good(tmp_path / "imgs", 6)
    write_bad_and_odd(tmp_path / "imgs" / "odd")
    url = str(tmp_path / "s.zarr")
    run_extract(str(tmp_path / "imgs"), url, SMALL, notify=quiet)
    return url


def test_info_counts_and_bytes(store_url, capsys):
    info = store_info(store_url)
    s = FeatureStore.open(store_url)
    assert info["images"] == s.n_images == 18
    assert info["status"] == {"pending": 0, "ok": 12, "failed": 6}
    assert info["features"]["shape"] == [18, 5, 128] and info["features"]["chunks"] == [4, 5, 128]
    assert info["bytes"]["raw_float16_per_image"] == 5 * 128 * 2
    assert 0 < info["bytes"]["features"] < info["bytes"]["on_disk"]
    assert info["teacher"]["arch"] == "zeroseg-tiny" and info["grids"] == [1, 2]
    result = zeroseg(capsys, "store", "info", store_url, "--json")
    assert result.exit_code == 0 and json.loads(result.output)["status"]["failed"] == 6
    text = zeroseg(capsys, "store", "info", store_url).output
    assert "12 ok, 6 failed" in text and "raw float16 1.2 KiB" in text


def test_verify_a_sound_store(store_url, capsys):
    report, problems, damage = verify_store(store_url)
    assert damage == []
    assert problems == []
    assert set(report["norms"]) == {"1x1", "2x2"} and report["norms"]["1x1"]["min"] > 0
    result = zeroseg(capsys, "store", "verify", store_url)
    assert result.exit_code == 0 and "no problems" in result.output


def test_verify_finds_each_problem(store_url, capsys):
    s = FeatureStore.open(store_url, mode="r+")
    ok = np.flatnonzero(s.status() == 1)
    failed = np.flatnonzero(s.status() == 2)
    f = s.features
    f[int(ok[0]), 1, 3] = np.nan
    f[int(ok[1]), 2] = 0  # one crop's feature all zero
    f[int(failed[0]), 0, 0] = 1.0
    errors = s.errors()
    errors[failed[1]] = ""
    s.group["images/error"][:] = errors
    status = s.status()
    status[-1] = 0  # pending
    s.group["images/status"][:] = status
    _, problems, _ = verify_store(store_url)
    text = "\n".join(problems)
    for words in ["1 images still pending", "1 ok images with NaN or inf", "1 ok images with an all-zero crop",
                  "1 failed images with non-zero features", "1 failed images without a reason"]:
        assert words in text, text
    result = zeroseg(capsys, "store", "verify", store_url)
    assert result.exit_code == 1 and result.output.count("problem:") == len(problems) == 5
