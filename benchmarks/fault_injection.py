"""Kill zeroseg's writing verbs at random points, re-run them, and check that nothing is lost.

For each verb (extract, text, train, index build, ablate) this script makes the artefact once
uninterrupted (the reference), then again and again with a SIGKILL of the whole process group at a
random moment of the run, followed by a re-run of the same command (train: `--resume` once a
checkpoint exists). After every re-run it checks: exit 0, no traceback on stderr, and the artefact
equal to the reference (arrays, vocabulary, weights, index bytes, results table). It prints one row
per kill (where the kill landed, judged from what was on disk) and a summary table.

    python benchmarks/fault_injection.py --kills 25 --work /tmp/zeroseg-faults

Runs on the CPU in a few minutes (tiny teacher, tiny student, one torch thread per job).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from zeroseg.stores.features import FeatureStore, StoreError  # noqa: E402
from zeroseg.stores.schema import Status  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def zeroseg(*args: str) -> list[str]:
    return [sys.executable, "-m", "zeroseg", *map(str, args)]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)


def run_timed(cmd: list[str], out: Path) -> tuple[float, float]:
    """Run cmd to the end; (seconds until `out` first appeared on disk, seconds in all). Kills are
    drawn from that window: before it a process is only importing torch."""
    t0 = time.perf_counter()
    job = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    existed = out.exists()  # a store that a verb writes into: no appearance to wait for
    while job.poll() is None:
        if first is None and not existed and out.exists():
            first = time.perf_counter() - t0
        time.sleep(0.02)
    total = time.perf_counter() - t0
    stderr = job.stderr.read()
    if job.returncode != 0 or "Traceback" in stderr:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {job.returncode}):\n{stderr[-3000:]}")
    return (first if first is not None else 0.5 * total), total


def run_killed(cmd: list[str], out: Path, existed: bool, after_s: float) -> bool:
    """Start cmd and SIGKILL its whole process group `after_s` after `out` appears on disk (or
    after start, for a verb that writes into an existing `out`): start-up (importing torch) varies
    from run to run, the work after it less. True if it was still running when killed."""
    job = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    seen = time.perf_counter() if existed else None
    while job.poll() is None:
        now = time.perf_counter()
        if seen is None and out.exists():
            seen = now
        if seen is not None and now - seen >= after_s:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
            return True
        time.sleep(0.01)
    return False


# ---- comparisons -------------------------------------------------------------------------


def store_arrays(url: str) -> dict[str, np.ndarray]:
    store = FeatureStore.open(url)
    return {"features": store.features[:], "status": store.status(), "error": store.errors(),
            "size": store.sizes(), "path": store.paths()}


def same_store(a: str, b: str) -> bool:
    x, y = store_arrays(a), store_arrays(b)
    return all(np.array_equal(x[k], y[k]) for k in x)


def same_vocabulary(a: str, b: str, vocab: str) -> bool:
    (na, ea), (nb, eb) = FeatureStore.open(a).read_text(vocab), FeatureStore.open(b).read_text(vocab)
    return na == nb and np.array_equal(ea, eb)


def weights(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    from zeroseg.trainer.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    return load_file(str(next(ckpt.glob("*.safetensors")) if ckpt.is_dir() else ckpt))


def same_weights(a: Path, b: Path) -> bool:
    x, y = weights(a), weights(b)
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def same_files(a: Path, b: Path, names: tuple[str, ...]) -> bool:
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def same_results(a: Path, b: Path) -> bool:
    """The ablation tables, without the wall-clock columns."""
    import csv

    def rows(p: Path):
        with open(p / "results.csv") as f:
            return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in csv.DictReader(f)]

    return rows(a) == rows(b)


# ---- scenarios -----------------------------------------------------------------------------


@dataclass
class Scenario:
    """A verb to kill: how to run it into `out`, how to tell its progress, how to compare."""

    name: str
    command: Callable[[Path], list[str]]
    rerun: Callable[[Path], list[str]]
    equal: Callable[[Path, Path], bool]
    landed: Callable[[Path], str]  # where the kill landed, from what is on disk
    prepare: Callable[[Path], None] = lambda out: None


def extract_progress(out: Path) -> str:
    try:
        status = FeatureStore.open(str(out)).status()
    except StoreError:
        return "before the store existed" if not out.exists() else "during the store's creation"
    done = int((status != Status.PENDING).sum())
    return f"{done}/{len(status)} images written"


def scenarios(work: Path) -> list[Scenario]:
    images, heldout, store = work / "scenes" / "images", work / "heldout", work / "store.zarr"
    extract_args = ("--grids", "1,2", "--view-size", "32", "--chunk-images", "8", "--batch", "40",
                    "--workers", "0")
    train_args = ("--preset", "tiny", "--steps", "60", "--batch", "8", "--threads", "1",
                  "--checkpoint-every", "10")

    old_names, old_embeddings = FeatureStore.open(str(store)).read_text("demo")

    def copy_store(out: Path) -> None:
        """text writes into a store: each attempt gets a copy holding an older vocabulary "demo"
        (the same classes reversed), which the run replaces."""
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(store, out)
        FeatureStore.open(str(out), mode="r+").write_text("demo", old_names[::-1], old_embeddings[::-1], ["{}"])

    def vocabulary_state(out: Path) -> str:
        names, embeddings = FeatureStore.open(str(out)).read_text("demo")
        if names == old_names[::-1] and np.array_equal(embeddings, old_embeddings[::-1]):
            return "old vocabulary, whole"
        if names == old_names and np.array_equal(embeddings, old_embeddings):
            return "new vocabulary, whole"
        raise SystemExit(f"{out}: a vocabulary that is neither the old nor the new one")

    def train_rerun(out: Path) -> list[str]:
        from zeroseg.trainer.checkpoint import latest_checkpoint

        if out.exists() and latest_checkpoint(out) is not None:
            return zeroseg("train", store, "--out", out, "--resume")
        return zeroseg("train", store, "--out", out, *train_args)

    def train_landed(out: Path) -> str:
        from zeroseg.trainer.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(out) if out.exists() else None
        return f"last checkpoint {ckpt.name}" if ckpt else "no checkpoint yet"

    index = ("index", "build", store, "--kind", "flat")
    ablate = ("ablate", store, "--eval", heldout, "--vocab", "demo", "--grid",
              '{"grid": {"mask_ratio": [0.0, 0.6]}}', "--steps", "20", "--student", "tiny", "--batch", "8",
              "--trials-parallel", "0", "--bg-threshold", "0.5")
    return [
        Scenario("extract", lambda o: zeroseg("extract", images, o, *extract_args),
                 lambda o: zeroseg("extract", images, o, *extract_args),
                 lambda a, b: same_store(str(a), str(b)), extract_progress),
        Scenario("text", lambda o: zeroseg("text", o, "--vocab", "demo", "--classes", work / "classes.txt"),
                 lambda o: zeroseg("text", o, "--vocab", "demo", "--classes", work / "classes.txt"),
                 lambda a, b: same_vocabulary(str(a), str(b), "demo"),
                 vocabulary_state,
                 prepare=copy_store),
        Scenario("train", lambda o: zeroseg("train", store, "--out", o, *train_args), train_rerun,
                 same_weights, train_landed),
        Scenario("index build", lambda o: zeroseg(*index, "--out", o), lambda o: zeroseg(*index, "--out", o),
                 lambda a, b: same_files(a, b, ("index.faiss",)),
                 lambda o: ", ".join(sorted(p.name for p in o.iterdir())) or "empty" if o.exists() else "nothing"),
        Scenario("ablate", lambda o: zeroseg(*ablate, "--out", o), lambda o: zeroseg(*ablate, "--out", o),
                 same_results,
                 lambda o: f"{len(list(o.glob('trials/*/result.json')))} trials done" if o.exists() else "nothing"),
    ]


def prepare_data(work: Path) -> None:
    """Scenes to extract and evaluate on, the store every later verb reads (with a vocabulary)."""
    from zeroseg.segment.datasets import SCENE_CLASSES

    if (work / "store.zarr").exists():
        return
    for split, n, where in (("train", 160, work / "scenes"), ("heldout", 8, work / "heldout")):
        check(run(zeroseg("scenes", where, "--n", n, "--split", split, "--size", 64)), "scenes")
    (work / "classes.txt").write_text("\n".join(SCENE_CLASSES) + "\n")
    check(run(zeroseg("extract", work / "scenes" / "images", work / "store.zarr", "--grids", "1,2",
                      "--view-size", "32", "--chunk-images", "8", "--batch", "40", "--workers", "0")), "extract")
    check(run(zeroseg("text", work / "store.zarr", "--vocab", "demo", "--classes", work / "classes.txt")), "text")


def check(done: subprocess.CompletedProcess, what: str) -> None:
    if done.returncode != 0 or "Traceback" in done.stderr:
        raise SystemExit(f"{what} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=25, help="kills in all, spread over the verbs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("bench-out/faults"))
    parser.add_argument("--only", default=None, help="comma-separated verbs to run (default all)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    prepare_data(args.work)
    chosen = [s for s in scenarios(args.work) if not args.only or s.name in args.only.split(",")]
    summary = []
    for i, s in enumerate(chosen):
        n_kills = args.kills // len(chosen) + (i < args.kills % len(chosen))
        reference = args.work / f"ref-{s.name.replace(' ', '-')}"
        shutil.rmtree(reference, ignore_errors=True)
        s.prepare(reference)
        first_s, ref_s = run_timed(s.command(reference), reference)
        survived = 0
        for k in range(n_kills):
            out = args.work / f"killed-{s.name.replace(' ', '-')}"
            shutil.rmtree(out, ignore_errors=True)
            s.prepare(out)
            existed = out.exists()
            window = ref_s if existed else ref_s - first_s  # the reference's time after `out` appeared
            after = rng.uniform(0.0, window)
            killed = run_killed(s.command(out), out, existed, after)
            landed = s.landed(out) if killed else "finished before the kill"
            check(run(s.rerun(out)), f"{s.name} re-run after kill {k + 1}")  # one re-run finishes it
            ok = s.equal(reference, out)
            survived += ok and killed
            print(f"{s.name:12s} kill {k + 1:2d} {after:5.1f} s into {window:4.1f} s of work: {landed:32s} "
                  f"re-run exit 0, {'identical' if ok else 'DIFFERENT'} to the uninterrupted run", flush=True)
            if not ok:
                raise SystemExit(f"{s.name}: the artefact after kill {k + 1} differs from the reference")
        summary.append((s.name, n_kills, survived, ref_s))
    print("\n| verb | kills | killed mid-run and identical after re-run | uninterrupted run (s) |")
    print("|---|---:|---:|---:|")
    for name, n, ok, ref_s in summary:
        print(f"| {name} | {n} | {ok} | {ref_s:.1f} |")
    print(f"| all | {sum(r[1] for r in summary)} | {sum(r[2] for r in summary)} | |")


if __name__ == "__main__":
    main()
