"""Neighbour index benchmark: for each index kind, built by `zeroseg index build` from a real Zarr
feature store, the bytes per vector in RAM (computed, and measured as the resident memory that
opening it adds) and on disk, build time, recall@10 against exact search and one-thread query
latency.

    PYTHONPATH=. python benchmarks/index.py --n 1000000 --work /tmp/ixbench   # benchmarks/README.md

The data: `--clusters` centres on the unit sphere; each vector is its centre plus a spread in a
64-dimensional subspace plus a little isotropic noise (real embeddings have a low intrinsic
dimension; pure isotropic noise in 512-d makes every in-cluster neighbour equally far and recall
meaningless). They are streamed into a store of crop features (FeatureStore.create, grids 1-4 =
30 crops per image, 64 images per chunk, float16, raw chunks as zeroseg writes them), so that the
store-reranked kind reads its candidates from a real store; never all in RAM (5M x 512 runs on
24 GiB). Queries are fresh draws from the same clusters; the truth is exact search over the
store's float16 vectors, streamed through its chunks.

Each index is opened and searched in a fresh child process: its own resident memory (Linux
RssAnon) before and after `open_for_query` and after the queries is what it takes, not a figure
computed from FAISS's layouts; the store pages a mapped store re-rank has resident (smaps) are
reported apart: they are the OS's file cache, shared and reclaimable. Latency: one thread
(faiss's and torch's), one query per search call, after every page of a mapped store was touched once and `--warmup` queries; the kinds
alternate over `--rounds` and the median of the rounds' p50 (p99) is reported. Builds use all cores.
`--rerank-factors 12,16,32` searches the store-reranked kinds with factor * k candidates, and
`--nprobes 8,16` with that many lists probed, a row each combination.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np

BATCH = 65_536
SUBSPACE = 64
GRIDS = (1, 2, 3, 4)  # 30 crops per image


class Clustered:
    """`clusters` centres on the unit sphere, a spread in a SUBSPACE-dimensional subspace and a little
    isotropic noise; `draw(m)` continues one random sequence (so n vectors drawn in BATCH-sized
    calls are the same whether kept in RAM or streamed to a store)."""

    def __init__(self, dim: int, clusters: int, seed: int):
        self.rng = np.random.default_rng(seed)
        self.centres = self.rng.standard_normal((clusters, dim), dtype=np.float32)
        self.centres /= np.linalg.norm(self.centres, axis=1, keepdims=True)
        self.basis = self.rng.standard_normal((SUBSPACE, dim), dtype=np.float32) / np.sqrt(dim)  # rows ~unit

    def draw(self, m: int) -> np.ndarray:
        rng, dim = self.rng, self.centres.shape[1]
        label = rng.integers(0, len(self.centres), m)
        spread = rng.standard_normal((m, SUBSPACE), dtype=np.float32) @ self.basis * (0.5 / np.sqrt(SUBSPACE))
        noise = rng.standard_normal((m, dim), dtype=np.float32) * (0.1 / np.sqrt(dim))
        return self.centres[label] + spread + noise

    def batches(self, n: int):
        for start in range(0, n, BATCH):
            yield self.draw(min(BATCH, n - start))


def clustered_vectors(n: int, dim: int, clusters: int, seed: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 database and (queries, dim) queries, held in RAM (benchmarks/index_refine.py)."""
    gen = Clustered(dim, clusters, seed)
    return np.concatenate(list(gen.batches(n))), gen.draw(queries).astype(np.float32)


def anon_rss() -> int:
    """This process's own resident memory now (Linux /proc/self/status RssAnon)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def mapped_rss(folder: str) -> int:
    """Resident pages of the files under `folder` that this process maps (/proc/self/smaps): a
    mapped store's page cache, shared with other readers and reclaimable."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
                inside = len(head) >= 6 and head[5].startswith(folder)
            elif inside and head and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def write_store(url: str, n: int, gen: Clustered) -> None:
    """n vectors from `gen` as a complete store of crop features, streamed chunk by chunk."""
    from zeroseg.stores.features import FeatureStore
    from zeroseg.stores.schema import Status, StoreConfig, TeacherInfo

    dim = gen.centres.shape[1]
    teacher = TeacherInfo("bench", "synthetic", "00" * 32, 224, (0.5,) * 3, (0.25,) * 3, dim)
    config = StoreConfig(teacher=teacher, grids=GRIDS, view_size=224, chunk_images=64)
    c = config.n_crops
    store = FeatureStore.create(url, config, [f"synthetic/{i}.jpg" for i in range(n // c)])
    pending, chunk = np.empty((0, dim), np.float32), 0
    for batch in gen.batches(n):
        pending = np.concatenate([pending, batch])
        while chunk < store.n_chunks:
            sl = store.chunk_slice(chunk)
            m = sl.stop - sl.start
            if len(pending) < m * c:
                break
            feats, pending = pending[: m * c].reshape(m, c, dim), pending[m * c :]
            store.write_chunk(chunk, feats, np.full(m, Status.OK, np.uint8), [""] * m, np.full((m, 2), 224, np.int32))
            chunk += 1


def unit_rows(store, first: int, last: int) -> np.ndarray:
    """Store chunks first..last-1 as unit float32 rows (n, D), crop by crop in id order."""
    x = np.asarray(store.features[store.chunk_slice(first).start : store.chunk_slice(last - 1).stop], np.float32)
    x = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    faiss.normalize_L2(x)
    return x


def exact_neighbours(url: str, queries: np.ndarray, k: int) -> np.ndarray:
    """The truth: exact top k (cosine) of each query over the store's float16 vectors, streamed
    through its chunks (never all in RAM)."""
    from zeroseg.stores.features import FeatureStore

    store = FeatureStore.open(url)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    faiss.normalize_L2(q)
    heap = faiss.ResultHeap(len(q), k, keep_max=True)
    step = 32  # chunks a read
    for first in range(0, store.n_chunks, step):
        scores, ids = faiss.knn(q, unit_rows(store, first, min(first + step, store.n_chunks)), k,
                                metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, ids + store.chunk_slice(first).start * store.n_crops)
    heap.finalize()
    return heap.I


def child(index_dir: str, queries_file: str, k: int, warmup: int, rerank_factor: int, nprobe: int) -> None:
    """Run in a fresh process: open the index (with its store), measure, print one JSON line."""
    import torch  # imported by the store re-rank: before measuring, as it is not the index's memory

    from zeroseg.segment.neighbours import open_for_query
    from zeroseg.stores.index import RERANK_FACTOR

    queries = np.load(queries_file)
    rss0 = anon_rss()
    index, store = open_for_query(index_dir, None)
    opened = anon_rss()
    if index.reranks_from_store and rerank_factor:
        index.meta.search_params[RERANK_FACTOR] = rerank_factor
    if nprobe:
        faiss.extract_index_ivf(index.index).nprobe = nprobe
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)  # the store re-rank's cast and dot run in torch: one thread too
    if index.reranks_from_store and index.rows.mapped is not None:
        # Steady state of a long-running query process: every page of the mapped store mapped
        # (the OS maps them a few at a time on first reads; an in-RAM kind is resident on load).
        mapped = index.rows.mapped.array
        mapped[:: max(1, mmap.PAGESIZE // mapped[0].nbytes), 0].copy()
    for q in queries[:warmup]:
        index.search(q[None], k)
    reads0 = index.rows.chunk_reads if index.reranks_from_store else 0
    times, found = [], []
    for q in queries[warmup:]:
        t0 = time.perf_counter()
        _, ids = index.search(q[None], k)
        times.append(time.perf_counter() - t0)
        found.append(ids[0])
    reads = (index.rows.chunk_reads - reads0) / len(times) if index.reranks_from_store else 0.0
    t = np.array(times) * 1e3
    print(json.dumps({"open_anon": opened - rss0, "after_anon": anon_rss() - rss0,
                      "after_file": mapped_rss(os.path.realpath(store.url)),
                      "factor": index.meta.search_params.get(RERANK_FACTOR, index.meta.search_params.get("k_factor_rf")),
                      "nprobe": index.meta.search_params.get("nprobe") and faiss.extract_index_ivf(index.index).nprobe,
                      "mapped": bool(index.reranks_from_store and index.rows.mapped is not None),
                      "p50": float(np.percentile(t, 50)), "p99": float(np.percentile(t, 99)), "chunk_reads": reads,
                      "found": np.array(found).tolist()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors (rounded down to whole images of 30 crops)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=1000, help="timed queries per kind")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kinds", default="ivf-pq,ivf-pq-sq8,ivf-rabitq-store,ivf-pq-store")
    ap.add_argument("--rerank-factors", default="0",
                    help="store-reranked kinds: candidates = factor * k, comma-separated, one row each (0: the index's own)")
    ap.add_argument("--nprobes", default="0", help="store-reranked kinds: lists probed, comma-separated (0: the index's own)")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds of every kind's queries")
    ap.add_argument("--work", default="/tmp/zeroseg-index-bench", help="folder for the store and the indices")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", nargs=4, metavar=("INDEX", "QUERIES", "FACTOR", "NPROBE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.k, args.warmup, int(args.child[2]), int(args.child[3]))

    from zeroseg.segment.neighbours import BuildConfig, build_index
    from zeroseg.stores.index import INDEX_FILE, STORE_RERANKED, choose_kind, index_footprint, store_rows
    from zeroseg.stores.features import FeatureStore

    work = Path(args.work)
    n = args.n // 30 * 30
    t0 = time.perf_counter()
    store_url, queries_file = str(work / "store"), work / "queries.npy"
    if not queries_file.exists():  # the store and its queries are made once (the queries last)
        gen = Clustered(args.dim, args.clusters, args.seed)
        write_store(store_url, n, gen)
        np.save(queries_file, gen.draw(args.warmup + args.queries).astype(np.float32))
    queries = np.load(queries_file)
    store_disk = sum(f.stat().st_size for f in (work / "store" / "crops" / "features").rglob("*") if f.is_file())
    print(f"store {n} x {args.dim} float16 at {store_url} ({store_disk / n:.0f} B a vector on disk), "
          f"{args.clusters} clusters, {args.queries} queries (+{args.warmup} warm-up), ready in "
          f"{time.perf_counter() - t0:.0f} s; faiss {faiss.__version__}", flush=True)

    t0 = time.perf_counter()
    truth = exact_neighbours(store_url, queries[args.warmup :], args.k)
    print(f"ground truth by exact search in {time.perf_counter() - t0:.0f} s", flush=True)

    runs = []  # (kind, index folder, build seconds, re-rank factor, nprobe)
    for kind in args.kinds.split(","):
        out, timing = work / f"ix-{kind}", work / f"build-{kind}.json"
        if not (out / INDEX_FILE).exists():
            t0 = time.perf_counter()
            build_index(store_url, out, BuildConfig(kind=kind))
            timing.write_text(json.dumps({"build_s": time.perf_counter() - t0}))
        build_s = json.loads(timing.read_text())["build_s"] if timing.exists() else float("nan")  # built before
        store_kind = kind in STORE_RERANKED
        for factor in args.rerank_factors.split(",") if store_kind else ["0"]:
            for nprobe in args.nprobes.split(",") if store_kind else ["0"]:
                runs.append((kind, out, build_s, factor, nprobe))

    # Each index searched in a fresh process, the kinds alternated round by round (this machine
    # is shared and noisy); latency is the median over rounds of each round's p50 and p99.
    measured: dict[int, list[dict]] = {i: [] for i in range(len(runs))}
    for round_ in range(args.rounds):
        for i, (kind, out, build_s, factor, nprobe) in enumerate(runs):
            run = subprocess.run([sys.executable, __file__, "--child", str(out), str(queries_file), factor, nprobe,
                                  "--k", str(args.k), "--warmup", str(args.warmup)],
                                 capture_output=True, text=True, check=True)
            measured[i].append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1} {kind} x{factor} nprobe {nprobe}: p50 {measured[i][-1]['p50']:.3f} ms", flush=True)
    rows = []
    for i, (kind, out, build_s, factor, nprobe) in enumerate(runs):
        r = measured[i][-1]
        found = np.array(r.pop("found"))
        recall = float(np.mean([len(set(f) & set(t)) / args.k for f, t in zip(found, truth)]))
        fp = index_footprint(kind, n, args.dim)
        row = {"kind": kind, "factory": fp["factory"], "build_s": build_s, "ram_computed": fp["ram_per_vector"],
               "disk": (out / INDEX_FILE).stat().st_size / n, "anon_open": r["open_anon"] / n,
               "anon_after": r["after_anon"] / n, "file_after": r["after_file"] / n, "recall": recall, **r,
               "p50": float(np.median([m["p50"] for m in measured[i]])),
               "p99": float(np.median([m["p99"] for m in measured[i]]))}
        rows.append(row)
        print(json.dumps(row), flush=True)

    auto = choose_kind(n, args.dim, store_rows(FeatureStore.open(store_url)))
    print(f"\n{n:,} x {args.dim} crop vectors in a store, {args.clusters} clusters, {args.queries} queries, "
          f"k={args.k}; auto picks {auto} here (available memory now)\n")
    print("| kind | factory | build s | RAM B/vector computed | own RSS B/vector on open | own RSS B/vector after "
          "queries | mapped store pages B/vector | disk B/vector | candidates / k | nprobe | recall@10 | p50 ms "
          "| p99 ms | chunk reads/query |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mark = " (auto)" if r["kind"] == auto else ""
        print(f"| {r['kind']}{mark} | `{r['factory']}` | {r['build_s']:.0f} | {r['ram_computed']:.0f} | "
              f"{r['anon_open']:.0f} | {r['anon_after']:.0f} | {r['file_after']:.0f} | {r['disk']:.0f} | "
              f"{r['factor'] or '-'} | {r['nprobe']} | {r['recall']:.3f} | {r['p50']:.3f} | {r['p99']:.3f} | {r['chunk_reads']:.1f} |")


if __name__ == "__main__":
    main()
