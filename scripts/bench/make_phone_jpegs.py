"""Phone-like 12 MP JPEGs for decoding and indexing benchmarks (never committed).

Random crops of the shared photos, upscaled to 4000 x 3000 (bicubic), with sensor-like
grain (a luma part and a smaller per-channel part), saved by Pillow at quality 92 with
4:2:0 chroma subsampling: 2.5-3.5 MB each, as a phone's.

    python3 scripts/bench/make_phone_jpegs.py OUT_DIR [COUNT] [--subsampling 4:2:0|4:4:4]

Needs numpy and Pillow (the reference venv has both).
"""

import argparse
import glob
import os

import numpy as np
from PIL import Image


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("count", nargs="?", type=int, default=48)
    ap.add_argument("--subsampling", default="4:2:0", choices=["4:2:0", "4:2:2", "4:4:4"])
    ap.add_argument("--photos", default=os.path.join(os.path.dirname(__file__), "../../../shared/data/photos"))
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    sources = sorted(glob.glob(os.path.join(args.photos, "*.png")))
    if not sources:
        raise SystemExit(f"no PNG photos in {args.photos} (pass --photos DIR)")
    images = [Image.open(f).convert("RGB") for f in sources]
    os.makedirs(args.out, exist_ok=True)
    for i in range(args.count):
        im = images[i % len(images)]
        w, h = im.size
        cw, ch = int(w * rng.uniform(0.6, 1)), int(h * rng.uniform(0.6, 1))
        x, y = int(rng.uniform(0, w - cw)), int(rng.uniform(0, h - ch))
        big = im.crop((x, y, x + cw, y + ch)).resize((4000, 3000), Image.BICUBIC)
        a = np.asarray(big).astype(np.float32)
        a += rng.normal(0, 4, (3000, 4000, 1)).astype(np.float32)
        a += rng.normal(0, 1.5, (3000, 4000, 3)).astype(np.float32)
        out = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        out.save(os.path.join(args.out, f"phone-{i:03d}.jpg"), quality=92, subsampling=args.subsampling)


if __name__ == "__main__":
    main()
