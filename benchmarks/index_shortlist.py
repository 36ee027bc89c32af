"""Where a store-reranked query's time goes, and which shortlist would need fewer candidates.
For each FAISS factory (or a built `index.faiss`) over benchmarks/index.py's store, the exact
re-rank from the store's mapped rows as `ivf-pq-store` does it (zeroseg.stores.index.StoreRows),
at each factor: recall@10, and p50 of the whole query, of FAISS's search alone and of the re-rank
alone. One thread (faiss and torch), one query per call, 100 warm-up queries, the entries
alternated over --rounds (medians).

    PYTHONPATH=. python benchmarks/index_shortlist.py --work /tmp/ixb5 --factors 24,32,49 \\
        --factories "/tmp/ixb5/ix-ivf-pq-store/index.faiss;IVF4096,PQ256x4fs"   # benchmarks/README.md

A factory is built here (trained on 40 vectors a list from random chunks, as zeroseg does, all
cores) and kept as WORK/shortlist-<factory>.faiss for the next run.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from index import exact_neighbours, unit_rows  # benchmarks/index.py: the truth, the store's rows

from zeroseg.stores.features import FeatureStore
from zeroseg.stores.index import StoreRows


def load_or_build(store: FeatureStore, entry: str, work: Path) -> faiss.Index:
    if entry.endswith(".faiss"):
        return faiss.read_index(entry)
    path = work / f"shortlist-{re.sub(r'[^A-Za-z0-9]+', '_', entry)}.faiss"
    if path.exists():
        return faiss.read_index(str(path))
    t0 = time.perf_counter()
    index = faiss.index_factory(store.dim, entry, faiss.METRIC_INNER_PRODUCT)
    nlist = int(re.search(r"IVF(\d+)", entry).group(1))
    order = np.random.default_rng(0).permutation(store.n_chunks)
    per_chunk = store.config.chunk_images * store.n_crops
    index.train(np.concatenate([unit_rows(store, c, c + 1) for c in order[: 40 * nlist // per_chunk + 1]]))
    for first in range(0, store.n_chunks, 32):
        x = unit_rows(store, first, min(first + 32, store.n_chunks))
        start = store.chunk_slice(first).start * store.n_crops
        index.add_with_ids(x, np.arange(start, start + len(x)))
    faiss.write_index(index, str(path))
    print(f"{entry}: built in {time.perf_counter() - t0:.0f} s", flush=True)
    return index


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, help="benchmarks/index.py's --work (its store and queries)")
    ap.add_argument("--factories", required=True, help="FAISS factory strings or index.faiss paths, ';'-separated")
    ap.add_argument("--factors", default="16,32", help="candidates per neighbour, comma-separated")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work, k = Path(args.work), 10
    store = FeatureStore.open(str(work / "store"))
    queries = np.load(work / "queries.npy")
    q = np.ascontiguousarray(queries[: 100 + args.queries], np.float32)
    faiss.normalize_L2(q)
    truth = exact_neighbours(str(work / "store"), queries[100 : 100 + args.queries], k)
    indexes = {e: load_or_build(store, e, work) for e in args.factories.split(";")}
    for index in indexes.values():
        faiss.ParameterSpace().set_index_parameters(index, f"nprobe={args.nprobe}")
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    rows = StoreRows(store, store.n_crops)
    plan = [(e, int(f)) for e in indexes for f in args.factors.split(",")]

    def run(entry: str, factor: int, qs: np.ndarray):
        found, total, search, rerank = [], [], [], []
        for query in qs:
            t0 = time.perf_counter()
            _, cand = indexes[entry].search(query[None], k * factor)
            t1 = time.perf_counter()
            cand = cand[0][cand[0] >= 0]
            exact = rows.scores(cand, query)
            found.append(cand[np.argsort(-exact, kind="stable")[:k]])
            t2 = time.perf_counter()
            total.append(t2 - t0), search.append(t1 - t0), rerank.append(t2 - t1)
        return found, [1e3 * float(np.median(t)) for t in (total, search, rerank)]

    for entry, factor in plan:
        run(entry, factor, q[:100])  # warm-up: the store's pages mapped
    times = {p: [] for p in plan}
    found = {}
    for _ in range(args.rounds):
        for p in plan:
            found[p], t = run(*p, q[100:])
            times[p].append(t)
    print(f"\n{store.n_images * store.n_crops:,} vectors, nprobe {args.nprobe}, {args.queries} queries, "
          f"median of {args.rounds} rounds\n")
    print("| shortlist | B/vector | candidates / k | recall@10 | p50 ms | FAISS search p50 ms | re-rank p50 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    n = store.n_images * store.n_crops
    for entry, factor in plan:
        recall = float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found[(entry, factor)], truth)]))
        med = np.median(np.array(times[(entry, factor)]), axis=0)
        size = faiss.serialize_index(indexes[entry]).nbytes / n
        print(f"| `{entry}` | {size:.0f} | {factor} | {recall:.3f} | {med[0]:.3f} | {med[1]:.3f} | {med[2]:.3f} |")


if __name__ == "__main__":
    main()
