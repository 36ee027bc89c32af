"""Neighbour index benchmark: for each index kind, built by `zeroseg index build` from a real Zarr
feature store, the bytes per vector in RAM (computed, and measured as the resident memory that
opening it adds) and on disk, build time, recall@10 against exact search and one-thread query
latency.

    PYTHONPATH=. python benchmarks/index.py --n 1000000 --work /tmp/ixbench   # benchmarks/README.md

The data: `--clusters` centres on the unit sphere; each vector is its centre plus a spread in a
64-dimensional subspace plus a little isotropic noise (real embeddings have a low intrinsic
dimension; pure isotropic noise in 512-d makes every in-cluster neighbour equally far and recall
meaningless). They are written as a store of crop features (FeatureStore.create, grids 1-4 =
30 crops per image, 64 images per chunk, float16), so that the store-reranked kind reads its
candidates from a real chunked, compressed store. Queries are fresh draws from the same clusters;
the truth is exact search over the store's (float16) vectors.

Each index is opened and searched in a fresh child process: its resident memory (Linux
/proc/self/statm) before and after `open_for_query` (index + store handle; the store-reranked
kind's chunk cache fills during the queries and is bounded by RERANK_CACHE_BYTES) is what it
takes, not a figure computed from FAISS's layouts. Latency: faiss.omp_set_num_threads(1), one query
per search call, after `--warmup` queries (which also warm the chunk cache); builds use all cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np

BATCH = 65_536
SUBSPACE = 64
GRIDS = (1, 2, 3, 4)  # 30 crops per image


def clustered_vectors(n: int, dim: int, clusters: int, seed: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 database and (queries, dim) queries, made batch by batch into one array."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = rng.standard_normal((SUBSPACE, dim), dtype=np.float32) / np.sqrt(dim)  # rows ~unit

    def draw(m: int) -> np.ndarray:
        label = rng.integers(0, clusters, m)
        spread = rng.standard_normal((m, SUBSPACE), dtype=np.float32) @ basis * (0.5 / np.sqrt(SUBSPACE))
        noise = rng.standard_normal((m, dim), dtype=np.float32) * (0.1 / np.sqrt(dim))
        return centres[label] + spread + noise

    data = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, BATCH):
        data[start : start + BATCH] = draw(min(BATCH, n - start))
    return data, draw(queries).astype(np.float32)


def rss_bytes() -> int:
    """Resident memory now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def write_store(url: str, data: np.ndarray, dim: int) -> None:
    """data (n_images * 30, dim) as a complete store of crop features, chunk by chunk."""
    from zeroseg.stores.features import FeatureStore
    from zeroseg.stores.schema import Status, StoreConfig, TeacherInfo

    teacher = TeacherInfo("bench", "synthetic", "00" * 32, 224, (0.5,) * 3, (0.25,) * 3, dim)
    config = StoreConfig(teacher=teacher, grids=GRIDS, view_size=224, chunk_images=64)
    feats = data.reshape(-1, config.n_crops, dim)
    store = FeatureStore.create(url, config, [f"synthetic/{i}.jpg" for i in range(len(feats))])
    for c in range(store.n_chunks):
        sl = store.chunk_slice(c)
        m = sl.stop - sl.start
        store.write_chunk(c, feats[sl], np.full(m, Status.OK, np.uint8), [""] * m, np.full((m, 2), 224, np.int32))


def child(index_dir: str, queries_file: str, k: int, warmup: int) -> None:
    """Run in a fresh process: open the index (with its store), measure, print one JSON line."""
    from zeroseg.segment.neighbours import open_for_query

    queries = np.load(queries_file)
    rss0 = rss_bytes()
    index, _ = open_for_query(index_dir, None)
    opened = rss_bytes() - rss0
    faiss.omp_set_num_threads(1)
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
    print(json.dumps({"open_rss": opened, "after_rss": rss_bytes() - rss0, "p50": float(np.percentile(t, 50)),
                      "p99": float(np.percentile(t, 99)), "chunk_reads": reads, "found": np.array(found).tolist()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors (rounded down to whole images of 30 crops)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=1000, help="timed queries per kind")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kinds", default="ivf-pq,ivf-pq-sq8,ivf-pq-store")
    ap.add_argument("--work", default="/tmp/zeroseg-index-bench", help="folder for the store and the indices")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", nargs=2, metavar=("INDEX", "QUERIES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1], args.k, args.warmup)

    from zeroseg.segment.neighbours import BuildConfig, build_index
    from zeroseg.stores.index import INDEX_FILE, choose_kind, index_footprint

    work = Path(args.work)
    n = args.n // 30 * 30
    t0 = time.perf_counter()
    data, queries = clustered_vectors(n, args.dim, args.clusters, args.seed, args.warmup + args.queries)
    data = data.astype(np.float16).astype(np.float32)  # what the store holds
    store_url = str(work / "store")
    if not (work / "store").exists():
        write_store(store_url, data, args.dim)
    print(f"store {n} x {args.dim} float16 at {store_url}, {args.clusters} clusters, "
          f"{args.queries} queries (+{args.warmup} warm-up), made in {time.perf_counter() - t0:.0f} s; "
          f"faiss {faiss.__version__}", flush=True)

    t0 = time.perf_counter()
    faiss.normalize_L2(data)
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(data)
    q = queries.astype(np.float32)
    faiss.normalize_L2(q)
    _, truth = exact.search(q[args.warmup :], args.k)  # ground truth, all threads, batched
    del exact, data
    np.save(work / "queries.npy", queries)
    print(f"ground truth by exact search in {time.perf_counter() - t0:.0f} s", flush=True)

    rows = []
    for kind in args.kinds.split(","):
        out = work / f"ix-{kind}"
        t0 = time.perf_counter()
        if not (out / INDEX_FILE).exists():
            build_index(store_url, out, BuildConfig(kind=kind))
        build_s = time.perf_counter() - t0
        run = subprocess.run([sys.executable, __file__, "--child", str(out), str(work / "queries.npy"),
                              "--k", str(args.k), "--warmup", str(args.warmup)],
                             capture_output=True, text=True, check=True)
        r = json.loads(run.stdout.strip().splitlines()[-1])
        found = np.array(r.pop("found"))
        recall = float(np.mean([len(set(f) & set(t)) / args.k for f, t in zip(found, truth)]))
        fp = index_footprint(kind, n, args.dim)
        row = {"kind": kind, "factory": fp["factory"], "build_s": build_s, "ram_computed": fp["ram_per_vector"],
               "disk": (out / INDEX_FILE).stat().st_size / n, "rss_open": r["open_rss"] / n,
               "rss_after": r["after_rss"] / n, "recall": recall, **r}
        rows.append(row)
        print(json.dumps(row), flush=True)

    auto = choose_kind(n, args.dim, in_store=True)
    print(f"\n{n:,} x {args.dim} crop vectors in a store, {args.clusters} clusters, {args.queries} queries, "
          f"k={args.k}; auto picks {auto} here (available memory now)\n")
    print("| kind | factory | build s | RAM B/vector computed | RSS B/vector on open | RSS B/vector after queries "
          "| disk B/vector | recall@10 | p50 ms | p99 ms | chunk reads/query |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mark = " (auto)" if r["kind"] == auto else ""
        print(f"| {r['kind']}{mark} | `{r['factory']}` | {r['build_s']:.0f} | {r['ram_computed']:.0f} | {r['rss_open']:.0f} | "
              f"{r['rss_after']:.0f} | {r['disk']:.0f} | {r['recall']:.3f} | {r['p50']:.3f} | {r['p99']:.3f} | "
              f"{r['chunk_reads']:.1f} |")


if __name__ == "__main__":
    main()
