#!/usr/bin/env python3
"""The transformers side of `cargo bench --bench blip2`: one checkpoint, one dtype, one
process (so that its peak memory is its own). Prints one JSON object:

    load_s      from_pretrained
    vision_s    vision encoder, one image
    gen1_s      generate 1 token (vision + Q-Former + prompt prefill + 1 step)
    token_ms    time per further generated token: (generate 21 - generate 1) / 20
    caption_s   a 20-token caption of a photo, end to end (processor included)
    peak_rss_mb peak resident memory of the process
    rss_mb      resident memory at the end

    python3 scripts/bench/peer_blip2.py bench-data/blip2-opt-2.7b-L2 --dtype bf16 --threads 2
    python3 scripts/bench/peer_blip2.py bench-data/blip2-opt-2.7b --dtype f16 --device cuda

On a GPU it also reports `gpu_peak_mb` (torch's peak allocation) and `caption8_s`, a
caption per image when 8 images are generated as one batch.
"""
import argparse
import json
import os
import resource
import sys
import time


SYNC = lambda: None  # noqa: E731  (torch.cuda.synchronize on a GPU)


def timed(fn, min_time, min_iters=2):
    fn()  # warm-up
    SYNC()
    n, start = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - start < min_time:
        fn()
        n += 1
    SYNC()
    return (time.perf_counter() - start) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image", default="tests/fixtures/photos/chelsea.png")
    ap.add_argument("--min-time", type=float, default=2.0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    global SYNC
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, AutoTokenizer
    try:
        from transformers import BlipImageProcessorPil
    except ImportError:  # older transformers
        from transformers import BlipImageProcessor as BlipImageProcessorPil

    torch.set_num_threads(args.threads)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    t = time.perf_counter()
    model = Blip2ForConditionalGeneration.from_pretrained(args.model, dtype=dtype).eval().to(args.device)
    if args.device.startswith("cuda"):
        SYNC = torch.cuda.synchronize
    load_s = time.perf_counter() - t
    proc = Blip2Processor(
        image_processor=BlipImageProcessorPil.from_pretrained(args.model),
        tokenizer=AutoTokenizer.from_pretrained(args.model),
        num_query_tokens=model.config.num_query_tokens,
    )
    image = Image.open(args.image).convert("RGB")
    out = {"dtype": args.dtype, "threads": args.threads, "torch": torch.__version__, "load_s": load_s, "device": args.device}
    dev = lambda x: {k: (v.to(args.device, dtype) if k == "pixel_values" else v.to(args.device)) for k, v in x.items()}  # noqa: E731
    with torch.inference_mode():
        inputs = dev(proc(images=image, return_tensors="pt"))
        pv = inputs["pixel_values"]
        out["vision_s"] = timed(lambda: model.vision_model(pixel_values=pv), args.min_time)

        def gen(n):
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1)

        g1 = timed(lambda: gen(1), args.min_time)
        g21 = timed(lambda: gen(21), args.min_time)
        out["gen1_s"] = g1
        out["token_ms"] = (g21 - g1) / 20 * 1000

        def caption():
            x = dev(proc(images=image, return_tensors="pt"))
            model.generate(**x, max_new_tokens=20, min_new_tokens=20, do_sample=False, num_beams=1)

        out["caption_s"] = timed(caption, args.min_time)
        if args.device != "cpu":
            def caption8():
                x = dev(proc(images=[image] * 8, return_tensors="pt"))
                model.generate(**x, max_new_tokens=20, min_new_tokens=20, do_sample=False, num_beams=1)

            out["caption8_s"] = timed(caption8, args.min_time) / 8
            out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open("/proc/self/status") as f:
        rss = [l for l in f if l.startswith("VmRSS:")]
    out["rss_mb"] = float(rss[0].split()[1]) / 1024 if rss else float("nan")
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
