"""What running an ablation's trials on Ray Tune costs against plain Ray tasks.

`zeroseg ablate` runs its trials x seeds as a Ray Tune grid (zeroseg/experiments/ablate.py): Tune
brings fault tolerance (a trial whose worker or node dies is retried elsewhere) and its records,
and starts one actor process per trial, where plain tasks reuse Ray's idle workers. This prints
the wall time of the same trials both ways: each trial is `--seconds` of one-thread torch work
(a stand-in for a short training) through the same `run_trial`, on a local Ray of `--cpus` CPUs.
A warm-up run of each kind comes first, the two kinds alternate over `--repeats` rounds, and the
medians are printed with Tune's overhead per trial.

    PYTHONPATH=. python benchmarks/ablate.py --trials 8 --seconds 10 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from zeroseg.experiments.ablate import _run_on_tune, run_trial  # noqa: E402


def busy(config: dict, run_dir: Path) -> dict:
    """`config["seconds"]` of one-thread torch work in the trial's process."""
    import torch

    torch.set_num_threads(1)
    x, start = torch.randn(256, 256), time.perf_counter()
    while time.perf_counter() - start < config["seconds"]:
        x = (x @ x).tanh()
    return {"miou": 0.0}


def jobs_in(out: Path, trials: int, seconds: float) -> list[dict]:
    return [{"trial": f"t{i}", "seed": 0, "key": f"k{i}", "config": {"seconds": seconds}, "fields": {},
             "run_dir": str(out / "trials" / f"k{i}")} for i in range(trials)]


def with_tasks(jobs: list[dict], parallel: int) -> None:
    """The trials as Ray tasks of one CPU each, `parallel` in flight (how ablate ran before Tune)."""
    remote = ray.remote(num_cpus=1, max_retries=0)(run_trial)
    queue, in_flight = list(jobs), []
    while queue or in_flight:
        while queue and len(in_flight) < parallel:
            in_flight.append(remote.remote(busy, queue.pop(0)))
        [ref], _ = ray.wait(in_flight, num_returns=1)
        in_flight.remove(ref)
        assert ray.get(ref)["status"] == "ok"


def with_tune(jobs: list[dict], parallel: int, out: Path) -> None:
    rows = _run_on_tune(busy, jobs, parallel, out, lambda: None)
    assert all(r["status"] == "ok" for r in rows.values())


def timed(kind: str, trials: int, seconds: float, cpus: int) -> float:
    out = Path(tempfile.mkdtemp(prefix=f"zeroseg-ablate-{kind}-"))
    try:
        jobs = jobs_in(out, trials, seconds)
        start = time.perf_counter()
        with_tasks(jobs, cpus) if kind == "tasks" else with_tune(jobs, cpus, out)
        return time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="work per trial")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ray.init(num_cpus=args.cpus, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False)
    kinds = ["tasks", "tune"]
    for kind in kinds:  # warm-up: Ray's first workers, Tune's first imports
        timed(kind, args.cpus, 0.5, args.cpus)
    walls: dict[str, list[float]] = {kind: [] for kind in kinds}
    for r in range(args.repeats):
        for kind in (kinds if r % 2 == 0 else kinds[::-1]):
            walls[kind].append(timed(kind, args.trials, args.seconds, args.cpus))
    ray.shutdown()
    tasks, tune = (statistics.median(walls[k]) for k in kinds)
    ideal = args.trials * args.seconds / args.cpus
    print(f"\n{args.trials} trials x {args.seconds:g} s of work, {args.cpus} at a time; median of {args.repeats} rounds")
    print("| engine | wall s | x ideal | overhead per trial s |")
    print("|---|---:|---:|---:|")
    for name, wall in (("Ray tasks", tasks), ("Ray Tune", tune)):
        print(f"| {name} | {wall:.1f} | {wall / ideal:.2f} | {(wall - ideal) * args.cpus / args.trials:.2f} |")
    print(f"Tune / tasks: {tune / tasks:.2f}")


if __name__ == "__main__":
    main()
