"""Neighbour index benchmark: build time, memory, recall@10 against exact search and one-thread
query latency for each index kind, on random-but-clustered vectors.

    PYTHONPATH=. python benchmarks/index.py --n 1000000          # the figures in benchmarks/README.md
    PYTHONPATH=. python benchmarks/index.py --n 100000 --sweep   # also sweep search parameters

The data: `--clusters` centres on the unit sphere; each vector is its centre plus a spread in a
64-dimensional subspace plus a little isotropic noise (real embeddings have a low intrinsic
dimension; pure isotropic noise in 512-d makes every in-cluster neighbour equally far and recall
meaningless). Queries are fresh draws from the same clusters, not database vectors.

Build adds in batches of 65536 with all cores (faiss's default threads); latency is measured with
faiss.omp_set_num_threads(1), one query per search call, after one warm-up call. (That setting
matters on a busy machine: with FAISS's default of all cores, one-query searches on the shared
2-core box took p50 24 ms (ivf-pq) and 8 ms (hnsw) instead of 0.29 and 1.1 ms at 100k, the
OpenMP team waiting for cores; a batch of 1000 queries took the same time either way.)

Memory is the resident memory the built index added (Linux /proc/self/statm before and after).
"""

from __future__ import annotations

import argparse
import resource
import time
from dataclasses import dataclass

import faiss
import numpy as np

from zeroseg.stores.index import IndexMeta, IndexSpec, NeighbourIndex, choose_kind, index_spec

BATCH = 65_536
SUBSPACE = 64


def clustered_vectors(n: int, dim: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 database and (1000, dim) queries, made batch by batch into one array."""
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
    return data, draw(1000)


def rss_gb() -> float:
    """Resident memory now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


@dataclass
class Row:
    kind: str
    factory: str
    params: str
    build_s: float
    index_gb: float  # resident memory the built index added
    recall: float
    p50_ms: float
    p99_ms: float


def build(spec: IndexSpec, data: np.ndarray, seed: int) -> tuple[NeighbourIndex, float, float]:
    """The index, its build time in s (train + add) and the resident memory it added in GiB."""
    rss0 = rss_gb()
    meta = IndexMeta("bench", spec.kind, spec.factory, spec.build_params, spec.search_params,
                     dim=data.shape[1], stride=1, count=0, store={})
    index = NeighbourIndex.new(spec, meta)
    t0 = time.perf_counter()
    if index.needs_training:
        pick = np.sort(np.random.default_rng(seed).choice(len(data), spec.train_size, replace=False))
        index.train(data[pick])
    for start in range(0, len(data), BATCH):
        stop = min(start + BATCH, len(data))
        index.add(data[start:stop], np.arange(start, stop))
    return index, time.perf_counter() - t0, rss_gb() - rss0


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t)) / k for f, t in zip(found, truth)]))


def latency_ms(index: NeighbourIndex, queries: np.ndarray, k: int) -> tuple[float, float, np.ndarray]:
    """One query per call on one thread: p50, p99 in ms, and the ids found."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.search(queries[:1], k)  # warm-up
        times, found = [], []
        for q in queries:
            t0 = time.perf_counter()
            _, ids = index.search(q[None], k)
            times.append(time.perf_counter() - t0)
            found.append(ids[0])
    finally:
        faiss.omp_set_num_threads(threads)
    t = np.array(times) * 1e3
    return float(np.percentile(t, 50)), float(np.percentile(t, 99)), np.array(found)


def measure(index: NeighbourIndex, queries, truth, k, params: str) -> tuple[float, float, float]:
    if params:
        faiss.ParameterSpace().set_index_parameters(index.index, params)
    p50, p99, found = latency_ms(index, queries, k)
    return recall_at(found, truth), p50, p99


SWEEPS = {
    "hnsw": ["efSearch=64", "efSearch=128", "efSearch=256", "efSearch=512"],
    "ivf-pq": [f"nprobe={p},k_factor_rf={f}" for p in (8, 16, 32, 64) for f in (8, 16, 32)],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--flat-latency-queries", type=int, default=100,
                    help="exact search is slow one query at a time; time this many")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--kinds", default="flat,hnsw,ivf-pq")
    ap.add_argument("--sweep", action="store_true", help="also try other search parameters")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    data, queries = clustered_vectors(args.n, args.dim, args.clusters, args.seed)
    queries = queries[: args.queries]
    print(f"data {args.n} x {args.dim} float32 ({data.nbytes / 2**30:.2f} GiB), {args.clusters} clusters, "
          f"{len(queries)} queries, made in {time.perf_counter() - t0:.1f} s; faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} build threads", flush=True)

    exact, flat_build, flat_gb = build(index_spec("flat", args.n, args.dim), data, args.seed)
    t0 = time.perf_counter()
    _, truth = exact.search(queries, args.k)  # ground truth, all threads, batched
    print(f"ground truth by exact search in {time.perf_counter() - t0:.1f} s", flush=True)

    rows: list[Row] = []
    for kind in args.kinds.split(","):
        spec = index_spec(kind, args.n, args.dim)
        if kind == "flat":
            index, build_s, size_gb = exact, flat_build, flat_gb
            q = queries[: args.flat_latency_queries]
            p50, p99, found = latency_ms(index, q, args.k)
            recall = recall_at(found, truth[: len(q)])
        else:
            index, build_s, size_gb = build(spec, data, args.seed)
            recall, p50, p99 = measure(index, queries, truth, args.k, "")
        params = spec.parameter_string(spec.search_params)
        rows.append(Row(kind, spec.factory, params, build_s, size_gb, recall, p50, p99))
        print(f"{kind}: built in {build_s:.1f} s, recall@{args.k} {recall:.3f}, p50 {p50:.3f} ms, "
              f"p99 {p99:.3f} ms, peak RSS so far {peak_rss_gb():.1f} GiB", flush=True)
        if args.sweep:
            for alt in [a for a in SWEEPS.get(kind, []) if a != params]:
                r, a50, a99 = measure(index, queries, truth, args.k, alt)
                rows.append(Row(kind, spec.factory, alt, build_s, size_gb, r, a50, a99))
                print(f"  {alt}: recall {r:.3f}, p50 {a50:.3f} ms, p99 {a99:.3f} ms", flush=True)
        if index is not exact:
            del index

    auto = choose_kind(args.n)
    print(f"\n{args.n:,} x {args.dim} vectors, {args.clusters} clusters, {len(queries)} queries, "
          f"k={args.k}; auto picks {auto}\n")
    print(f"| kind | factory | search params | build s | memory GiB | recall@{args.k} | p50 ms | p99 ms |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    auto_spec = index_spec(auto, args.n, args.dim)
    auto_params = auto_spec.parameter_string(auto_spec.search_params)
    for r in rows:
        mark = " (auto)" if r.kind == auto and r.params in (auto_params, "") else ""
        print(f"| {r.kind}{mark} | `{r.factory}` | {r.params or '-'} | {r.build_s:.1f} | {r.index_gb:.2f} | "
              f"{r.recall:.3f} | {r.p50_ms:.3f} | {r.p99_ms:.3f} |")
    print(f"\npeak RSS {peak_rss_gb():.1f} GiB")


if __name__ == "__main__":
    main()
