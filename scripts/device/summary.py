#!/usr/bin/env python3
"""Summary of scripts/device/gpu-check.sh's results (the JSON files in its output folder):
magpie on the GPU against PyTorch/transformers on the same GPU, same weights, same
precision (f16), with the ratios issue 7 asks for.

    python3 scripts/device/summary.py OUT_DIR
"""
import json
import os
import sys


def load(d, name):
    p = os.path.join(d, name)
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def mib(d, name):
    try:
        with open(os.path.join(d, name)) as f:
            return float(f.read().strip())
    except (OSError, ValueError):
        return None


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def main():
    d = sys.argv[1]
    lines = []
    for m, label in (("clip-b32", "CLIP ViT-B/32"), ("clip-l14", "CLIP ViT-L/14")):
        mg, pt = load(d, f"{m}.magpie.json"), load(d, f"{m}.torch.json")
        if not mg and not pt:
            continue
        lines.append(f"{label} (f16)                 magpie    PyTorch   ratio (>1: magpie faster)")
        for b in ("1", "64"):
            a = (mg or {}).get("clip", {}).get("images_per_s", {}).get(b)
            p = (pt or {}).get("pytorch", {}).get(b)
            r = a / p if a and p else None
            lines.append(f"  images/s, batch {b:<4}         {fmt(a):>8}  {fmt(p):>8}   {fmt(r, '.2f')}x")
        for t in ("8", "77"):
            a = (mg or {}).get("clip", {}).get("text_query_ms", {}).get(t)
            p = (pt or {}).get("text_ms", {}).get(t)
            r = p / a if a and p else None
            lines.append(f"  text query ms, {t:<3} tokens     {fmt(a, '.2f'):>8}  {fmt(p, '.2f'):>8}   {fmt(r, '.2f')}x")
        lines.append(f"  peak GPU memory MiB          {fmt(mib(d, f'{m}.magpie.mib'), '.0f'):>8}  {fmt((pt or {}).get('gpu_peak_mb'), '.0f'):>8}   (magpie: nvidia-smi, whole card; PyTorch: its allocator)")
        lines.append("")
    mg, pt = load(d, "blip2.magpie.json"), load(d, "blip2.torch.json")
    if mg or pt:
        b = (mg or {}).get("blip2", {})
        pt = pt or {}
        lines.append("BLIP-2 OPT-2.7b (f16)              magpie  transformers   ratio")
        for key, pkey, label, unit in (
            ("vision_s", "vision_s", "vision encoder, s", ".3f"),
            ("token_ms", "token_ms", "ms per generated token", ".2f"),
            ("caption_s", "caption_s", "20-token caption, s", ".3f"),
            ("caption_s_per_image_batched", "caption8_s", "caption in batches of 8, s/img", ".3f"),
        ):
            a, p = b.get(key), pt.get(pkey)
            r = a / p if a and p else None
            lines.append(f"  {label:<32} {fmt(a, unit):>8}  {fmt(p, unit):>10}   {fmt(r, '.2f')}x the time")
        if b.get("caption_s"):
            lines.append(f"  captions per second (batched)     {fmt(1 / b['caption_s_per_image_batched'] if b.get('caption_s_per_image_batched') else None, '.2f'):>8}")
        lines.append(f"  peak GPU memory MiB               {fmt(mib(d, 'blip2.magpie.mib'), '.0f'):>8}  {fmt(pt.get('gpu_peak_mb'), '.0f'):>10}")
    print("\n".join(lines) if lines else "no results")


if __name__ == "__main__":
    main()
