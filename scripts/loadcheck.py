#!/usr/bin/env python3
"""Load check of `magpie serve` (not a test): N concurrent clients search over loopback
for a fixed time while an index job runs, then the throughput, latency percentiles and
error count are printed.

    python3 scripts/loadcheck.py --magpie target/release/magpie [--clients 50] [--seconds 30]

It makes two folders of JPEGs from the shared photos (random crops, resized, so each
file is new to the index): `base` (indexed before the clock starts, so searches have
something to find) and `incoming` (indexed by a job started over the API just before
the clients start; it must still be running when they stop, or the check says so).
Uses the tiny test models on the CPU. Only the standard library and Pillow.
"""
import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["cat", "rocket", "coffee", "a photo of a dog", "moon", "coins", "horse", "space", "a red motorcycle",
         "grass", "text", "an astronaut", "cell", "brick wall", "night sky"]


def make_images(src_dir, out_dir, n, seed):
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    srcs = [os.path.join(src_dir, f) for f in sorted(os.listdir(src_dir))
            if f.lower().endswith((".png", ".jpg", ".jpeg"))]
    imgs = [Image.open(p).convert("RGB") for p in srcs]
    for i in range(n):
        im = imgs[i % len(imgs)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        side = rng.choice([480, 640, 800, 1024])
        crop = im.crop((x, y, x + cw, y + ch))
        crop.thumbnail((side, side))
        crop.save(os.path.join(out_dir, f"img-{seed}-{i:05d}.jpg"), quality=88)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def call(base, path, method="GET", body=None, timeout=30):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read() or b"null")


def wait_job(base, job_id, timeout=600):
    t = time.time()
    while time.time() - t < timeout:
        _, j = call(base, f"/api/jobs/{job_id}")
        if j["state"] != "running":
            return j
        time.sleep(0.2)
    raise SystemExit(f"job {job_id} did not finish")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--magpie", default=os.path.join(ROOT, "target/release/magpie"))
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--base-images", type=int, default=400)
    ap.add_argument("--incoming-images", type=int, default=4000)
    ap.add_argument("--photos", default=os.path.join(ROOT, "..", "shared", "data", "photos"))
    args = ap.parse_args()
    if not os.path.isdir(args.photos):
        args.photos = os.path.join(ROOT, "tests", "fixtures", "photos")
    tmp = tempfile.mkdtemp(prefix="magpie-load-")
    server = None
    try:
        root = os.path.join(tmp, "photos")
        print(f"making {args.base_images} + {args.incoming_images} JPEGs…", file=sys.stderr)
        make_images(args.photos, os.path.join(root, "base"), args.base_images, 1)
        make_images(args.photos, os.path.join(tmp, "incoming-staging"), args.incoming_images, 2)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = open(os.path.join(tmp, "server.log"), "w")
        server = subprocess.Popen(
            [args.magpie, "--data-dir", os.path.join(tmp, "data"), "--model", os.path.join(ROOT, "tests/fixtures/clip/tiny-a"),
             "--caption-model", os.path.join(ROOT, "tests/fixtures/blip2/tiny-a"), "--device", "cpu",
             "serve", "--bind", f"127.0.0.1:{port}", "--root", root],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        for _ in range(300):
            try:
                call(base, "/api/health", timeout=1)
                break
            except Exception:
                time.sleep(0.1)
        _, job = call(base, "/api/jobs/index", "POST", {})
        first = wait_job(base, job["id"])
        print(f"base: {first['result']}", file=sys.stderr)
        shutil.move(os.path.join(tmp, "incoming-staging"), os.path.join(root, "incoming"))
        _, job = call(base, "/api/jobs/index", "POST", {})

        latencies, errors, lock = [], [], threading.Lock()
        stop = time.time() + args.seconds

        def client(i):
            rng = random.Random(i)
            mine, errs = [], []
            while time.time() < stop:
                q = urllib.parse.quote(rng.choice(WORDS))
                mode = rng.choice(["hybrid", "vector", "text"])
                t = time.perf_counter()
                try:
                    status, body = call(base, f"/api/search?q={q}&mode={mode}&k=40")
                    if status != 200 or not isinstance(body.get("hits"), list):
                        errs.append(f"status {status}")
                except Exception as e:  # HTTP errors, timeouts, resets
                    errs.append(repr(e))
                mine.append(time.perf_counter() - t)
            with lock:
                latencies.extend(mine)
                errors.extend(errs)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.time() - t0
        _, during = call(base, f"/api/jobs/{job['id']}")
        latencies.sort()
        pct = lambda p: latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000
        out = {
            "clients": args.clients,
            "seconds": round(elapsed, 1),
            "requests": len(latencies),
            "throughput_rps": round(len(latencies) / elapsed, 1),
            "p50_ms": round(pct(50), 1),
            "p99_ms": round(pct(99), 1),
            "max_ms": round(latencies[-1] * 1000, 1),
            "errors": len(errors),
            "error_kinds": sorted(set(errors))[:5],
            "index_job_when_clients_stopped": {"state": during["state"], "progress": during["progress"]},
        }
        print(json.dumps(out, indent=2))
        if during["state"] != "running":
            print("note: the index job ended before the clients did; use more --incoming-images", file=sys.stderr)
        call(base, f"/api/jobs/{job['id']}", "DELETE")
    finally:
        if server:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
