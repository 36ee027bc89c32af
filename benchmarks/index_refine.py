"""Which compressed re-ranking copy would let an in-RAM index fit ~200 B a vector? FAISS factory
strings built in this process on benchmarks/index.py's data (the same clustered vectors, seed
and float16 rounding), recall@10 against exact search and one-thread latency of one query per
call, for each re-ranking factor given.

    PYTHONPATH=. python benchmarks/index_refine.py --n 1000000 \\
        --factories "IVF2048,PQ64x4fs,Refine(PQ128x8);IVF2048,PQ128x4fs,Refine(PQ128x8)"   # benchmarks/README.md

Bytes a vector are the written index's size over n (codes, list ids, refine codes; a zeroseg
index adds its IDMap's 8 B). Builds use all cores (faiss's default), searches one thread.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import faiss
import numpy as np

from index import clustered_vectors  # benchmarks/index.py: the data

TRAIN_VECTORS = 40 * 2048  # as zeroseg trains an IVF2048 (40 vectors a list)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--factories", required=True, help="FAISS factory strings separated by ';' (metric inner product)")
    ap.add_argument("--k-factors", default="16,32,64", help="re-ranking factors (k_factor_rf) to search with")
    ap.add_argument("--nprobe", type=int, default=16)
    ap.add_argument("--queries", type=int, default=200, help="timed queries")
    ap.add_argument("--warmup", type=int, default=100)
    args = ap.parse_args()

    data, queries = clustered_vectors(args.n, args.dim, args.clusters, 0, args.warmup + args.queries)
    data = data.astype(np.float16).astype(np.float32)  # what a store holds
    faiss.normalize_L2(data)
    faiss.normalize_L2(queries)
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(data)
    _, truth = exact.search(queries[args.warmup:], 10)
    del exact
    threads = faiss.omp_get_max_threads()
    print(f"{args.n:,} x {args.dim}, {args.clusters} clusters, {args.queries} queries (+{args.warmup} warm-up), "
          f"nprobe {args.nprobe}, faiss {faiss.__version__}\n")
    print("| factory | build s | B/vector | k_factor_rf | recall@10 | p50 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for factory in args.factories.split(";"):
        faiss.omp_set_num_threads(threads)
        t0 = time.perf_counter()
        index = faiss.index_factory(args.dim, factory, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(0).choice(args.n, min(args.n, TRAIN_VECTORS), replace=False)
        index.train(data[sample])
        index.add(data)
        build = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            faiss.write_index(index, os.path.join(tmp, "index.faiss"))
            per_vector = os.path.getsize(os.path.join(tmp, "index.faiss")) / args.n
        faiss.omp_set_num_threads(1)
        for kf in (int(k) for k in args.k_factors.split(",")):
            faiss.ParameterSpace().set_index_parameters(index, f"nprobe={args.nprobe},k_factor_rf={kf}")
            for q in queries[:args.warmup]:
                index.search(q[None], 10)
            times, found = [], []
            for q in queries[args.warmup:]:
                t0 = time.perf_counter()
                _, ids = index.search(q[None], 10)
                times.append(time.perf_counter() - t0)
                found.append(ids[0])
            recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
            print(f"| `{factory}` | {build:.0f} | {per_vector:.1f} | {kf} | {recall:.3f} | {np.median(times) * 1e3:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
