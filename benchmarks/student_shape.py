"""Where the student loses shape, and what gives it back: variants of the demo side by side.

    PYTHONPATH=. python benchmarks/student_shape.py --out shape-out [--variants base,teacher2000,...]

Each variant is a DemoConfig (the toy teacher's steps, the student's recipe, its steps); each runs
the whole demo loop into OUT/<variant> (stages reused across runs, as `zeroseg demo` reuses them)
and then `zeroseg diagnose` on its first student: per held-out object, zero-shot shape from the
teacher's crop around the object, from the cache's best grid crop, from the student's truth-pooled
patches and from its segment, and a linear probe of shape in the student's patches. One table.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from zeroseg.experiments.demo import PRESETS, DemoConfig, run_demo
from zeroseg.experiments.diagnose import SOURCES, diagnose

BASE = PRESETS["default"]


def variant(teacher_steps: int = 500, **fields) -> DemoConfig:
    # two seeds of the student alone: the pair trains side by side, one core each
    fields = {"students": ("student",), "seeds": (0, 1), **fields}
    return dataclasses.replace(BASE, teacher=dataclasses.replace(BASE.teacher, steps=teacher_steps), **fields)


VARIANTS = {
    "base": variant(),
    "teacher1000": variant(1000),
    "teacher2000": variant(2000),
    "teacher2000+conv": variant(2000, recipe="shape"),  # the shape recipe: localised + conv stem
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    console = Console(stderr=True)
    table = Table(title="the student's shape, variant by variant (held-out scenes)")
    for col in ("variant", "student mIoU", "grid", "bound", "scene-object acc.",
                "shape: teacher crop", "best grid crop", "student patches", "its segment", "probe: patches", "s"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name in args.variants.split(","):
        t0 = time.perf_counter()
        summary = run_demo(args.out / name, VARIANTS[name], console=console)
        r = summary["results"]
        store, train, heldout = summary["store"], args.out / name / "scenes" / "train", args.out / name / "scenes" / "heldout"
        d = diagnose(summary["runs"]["student"][0], store, "scenes", train, heldout, limit=200)["sources"]
        s = r["student"]["seeds"]
        table.add_row(
            name, f"{s['mean']:.3f} ± {s['std']:.3f}", f"{r['grid']['miou']:.3f}", f"{r['ceiling']['miou']:.3f}",
            f"{summary['teacher']['scene_object_accuracy']:.3f}",
            *(f"{d[src]['zero_shot_shape']:.3f}" for src in SOURCES), f"{d[SOURCES[2]]['probe_shape']:.3f}",
            f"{time.perf_counter() - t0:.0f}",
        )
        Console(width=200).print(table)


if __name__ == "__main__":
    main()
