#!/usr/bin/env python3
"""The hnswlib side of `cargo bench --bench index`.

Same data as the Rust side (Fashion-MNIST IDX files, pixels as f32, L2-normalised,
cosine), same graph parameters and build threads, queries one at a time on one thread
(`knn_query` of the whole set with `num_threads=1`: hnswlib's C++ loop, no Python per
query; timed in this thread's CPU time, as the Rust side), recall@k against the exact ids
the Rust side computed. Prints one JSON object.

    python3 scripts/bench/peer_hnswlib.py --train train-images-idx3-ubyte.gz \
        --test t10k-images-idx3-ubyte.gz --truth bench-data/fmnist-knn10-60000x10000.u32 \
        --queries 10000 --threads 2 --efs 16,32,64,128,256

Needs hnswlib and numpy.
"""
import argparse
import gzip
import json
import sys
import time
from importlib.metadata import version

import hnswlib
import numpy as np


def read_images(path):
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    magic, n, rows, cols = np.frombuffer(raw[:16], dtype=">u4")
    assert magic == 0x0803, f"{path}: not an IDX file of u8 images"
    x = np.frombuffer(raw[16:], dtype=np.uint8).reshape(n, rows * cols).astype(np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    assert (norms > 0).all(), f"{path}: a blank image"
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", required=True)
    ap.add_argument("--test", required=True)
    ap.add_argument("--truth", required=True, help="u32 LE, queries x k exact ids")
    ap.add_argument("--queries", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--efs", default="16,32,64,128,256")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--min-time", type=float, default=2.0)
    ap.add_argument("--min-passes", type=int, default=2)
    args = ap.parse_args()

    train = read_images(args.train)
    queries = read_images(args.test)[: args.queries]
    truth = np.fromfile(args.truth, dtype="<u4").reshape(len(queries), args.k)

    index = hnswlib.Index(space="cosine", dim=train.shape[1])
    index.init_index(max_elements=len(train), ef_construction=args.ef_construction, M=args.m, random_seed=100)
    t = time.perf_counter()
    index.add_items(train, np.arange(len(train)), num_threads=args.threads)
    build_s = time.perf_counter() - t

    out = {
        "hnswlib": version("hnswlib"),
        "numpy": np.__version__,
        "threads": args.threads,
        "build_s": build_s,
        "build_rate": len(train) / build_s,
        "efs": {},
    }
    for ef in [int(e) for e in args.efs.split(",")]:
        index.set_ef(ef)
        best, passes, start = float("inf"), 0, time.perf_counter()
        while passes < args.min_passes or time.perf_counter() - start < args.min_time:
            # num_threads=1 runs the loop on this thread, so its CPU time is the query time.
            t = time.thread_time()
            labels, _ = index.knn_query(queries, k=args.k, num_threads=1)
            best = min(best, time.thread_time() - t)
            passes += 1
        hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(labels, truth))
        out["efs"][str(ef)] = {"recall": hits / truth.size, "qps": len(queries) / best}
        print(f"hnswlib ef={ef}: recall {hits / truth.size:.4f}, {len(queries) / best:.0f} q/s", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
