"""`zeroseg diagnose`: the probes read what is there and nothing else; the verb's report on the tiny demo."""

import json

import numpy as np
from typer.testing import CliRunner

from zeroseg.cli import app
from zeroseg.experiments.diagnose import SOURCES, linear_probe


def test_linear_probe_reads_a_separable_label_and_not_a_random_one():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 16))
    y = (x[:, 3] > 0).astype(np.int64) + 2 * (x[:, 7] > 0)  # 4 classes, each a sign pattern of two dims
    assert linear_probe(x[:300], y[:300], x[300:], y[300:]) >= 0.9
    noise = rng.integers(0, 4, size=400)  # labels that no direction predicts
    assert linear_probe(x[:300], noise[:300], x[300:], noise[300:]) <= 0.45


def test_diagnose_verb_scores_every_source_on_every_object(tiny_demo, tmp_path):
    out, summary = tiny_demo
    result = CliRunner().invoke(app, [
        "diagnose", summary["runs"]["student"][0], str(out / "scenes" / "heldout"), "--store", summary["store"],
        "--vocab", "scenes", "--train", str(out / "scenes" / "train"), "--out", str(tmp_path),
    ])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "diagnose.json").read_text())
    assert json.loads(result.stdout) == report  # stdout is the report alone (progress goes to stderr)
    # every object of the 6 held-out and 16 train tiny scenes (1..4 objects each) is a sample
    assert 6 <= report["objects"]["test"] <= 24 and 16 <= report["objects"]["fit"] <= 64
    assert list(report["sources"]) == list(SOURCES)
    for row in report["sources"].values():
        assert set(row) == {"zero_shot_class", "zero_shot_colour", "zero_shot_shape", "probe_colour", "probe_shape"}
        assert all(0.0 <= v <= 1.0 for v in row.values())
        # a right class has a right colour and shape: class accuracy bounds both from below
        assert row["zero_shot_class"] <= min(row["zero_shot_colour"], row["zero_shot_shape"])
