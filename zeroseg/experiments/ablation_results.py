"""An ablation's results: the Markdown tables (mIoU mean ± std over seeds), results.csv and the
mIoU plot, from the rows of its trials."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from zeroseg.outputs import write_atomic


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def groupings(fields: list[str]) -> list[str]:
    """What the tables and plot panels group by: every trial first (the paper's table), then each
    varied field on its own (averaged over the others) when more than one field varies."""
    return ["trial"] + (fields if len(fields) > 1 else [])


def miou_by(rows: list[dict[str, Any]], key: str) -> dict[str, list[float]]:
    """mIoU in % of the successful rows, grouped by `key`'s value, in the order first seen."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault(str(r[key]), []).append(100 * float(r["miou"]))
    return groups


def render_tables(rows: list[dict[str, Any]], fields: list[str]) -> str:
    """Markdown: a table of the trials (their field values, mIoU mean +- std over seeds), then one
    per varied field when several vary; failed trials listed with their errors."""
    parts = []
    for key in groupings(fields):
        shown = [f for f in fields if key == "trial"]  # the trial table also shows its fields
        values = {str(r[key]): r for r in rows}
        parts.append("| " + " | ".join([key, *shown, "mIoU (%)", "seeds"]) + " |")
        parts.append("|" + "---|" * (len(shown) + 3))
        for value, mious in miou_by(rows, key).items():
            m, sd = mean_std(mious)
            cells = [value, *(str(values[value][f]) for f in shown), f"{m:.1f} ± {sd:.1f}", str(len(mious))]
            parts.append("| " + " | ".join(cells) + " |")
        parts.append("")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        parts.append("Failed trials:\n")
        parts += [f"- {r['trial']} (seed {r['seed']}): {r['error']}" for r in failed]
        parts.append("")
    return "\n".join(parts)


def plot(rows: list[dict[str, Any]], fields: list[str], path: Path) -> None:
    """mIoU (mean, std error bars) per trial, and against each field when several vary."""
    import matplotlib  # a third of a second to import: only when there is a plot to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = groupings(fields)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        groups = miou_by(rows, key)
        stats = [mean_std(v) for v in groups.values()]
        ax.errorbar(range(len(groups)), [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=4)
        ax.set_xticks(range(len(groups)), list(groups), rotation=20, ha="right")
        ax.set_xlabel(key)
        ax.set_ylabel("held-out mIoU (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, png.getvalue())


def write_results(rows: list[dict[str, Any]], fields: list[str], out: Path, footer: str = "") -> str:
    """results.csv, results.md (the tables, then `footer`) and miou.png in out; returns the Markdown."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(out / "results.csv", table.getvalue())
    markdown = render_tables(rows, fields) + footer
    write_atomic(out / "results.md", markdown)
    if any(r["status"] == "ok" for r in rows):
        plot(rows, fields, out / "miou.png")
    return markdown
