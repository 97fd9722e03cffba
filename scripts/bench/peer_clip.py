#!/usr/bin/env python3
"""The PyTorch (transformers) and ONNX Runtime side of `cargo bench --bench clip`.

Runs the same checkpoint on the same thread count and prints one JSON object:
image embeddings per second at each batch size, text query latency per token count.

    python3 scripts/bench/peer_clip.py bench-data/clip-vit-base-patch32 --threads 2
    python3 scripts/bench/peer_clip.py bench-data/clip-vit-large-patch14 --device cuda --dtype f16 --batches 1,64

On a GPU (`--device cuda`) ONNX Runtime is skipped and `gpu_peak_mb` is added.
"""
import argparse
import json
import os
import sys
import time


SYNC = lambda: None  # noqa: E731  (torch.cuda.synchronize on a GPU)


def timed(fn, min_time, min_iters=3):
    fn()  # warm-up
    SYNC()
    n, start = 0, time.perf_counter()
    while n < min_iters or time.perf_counter() - start < min_time:
        fn()
        n += 1
    SYNC()
    return (time.perf_counter() - start) / n


def timed_median(fn, min_time, min_iters=3):
    """Median seconds per call: a latency, which a busy neighbour's occasional slow call
    does not move as it moves the mean."""
    fn()  # warm-up
    SYNC()
    times, start = [], time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        SYNC()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def features(x):
    """transformers 5 returns a model output from get_*_features; 4 returned the tensor."""
    return x.pooler_output if hasattr(x, "pooler_output") else x


def parity(model, folder, device, dtype):
    """Embeddings of the bench's own inputs: magpie's preprocessed photos (raw float32,
    shape in input.json) and token ids, one text at a time (no padding)."""
    import numpy as np
    import torch

    spec = json.load(open(os.path.join(folder, "input.json")))
    px = np.fromfile(os.path.join(folder, "pixels.f32"), dtype="<f4").reshape(spec["pixel_shape"])
    img = features(model.get_image_features(pixel_values=torch.from_numpy(px).to(device, dtype)))
    txt = [features(model.get_text_features(input_ids=torch.tensor([ids]).to(device)))[0] for ids in spec["input_ids"]]
    return {
        "image_embeds": img.float().cpu().tolist(),
        "text_embeds": [t.float().cpu().tolist() for t in txt],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--tokens", default="8,77")
    ap.add_argument("--min-time", type=float, default=3.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    ap.add_argument("--parity", help="a directory with pixels.f32 and input.json (written by the Rust bench): "
                    "the model's image and text embeddings of those inputs go into the output's \"parity\"")
    args = ap.parse_args()
    global SYNC
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import numpy as np
    import torch
    from transformers import CLIPModel

    torch.set_num_threads(args.threads)
    out = {"threads": args.threads, "torch": torch.__version__, "pytorch": {}, "onnxruntime": {}, "text_ms": {}}
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model = CLIPModel.from_pretrained(args.model, dtype=dtype).eval().to(args.device)
    if args.device.startswith("cuda"):
        SYNC = torch.cuda.synchronize
    out["device"], out["dtype"] = args.device, args.dtype
    size = model.config.vision_config.image_size
    batches = [int(b) for b in args.batches.split(",")]
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        for b in batches:
            px = torch.from_numpy(rng.standard_normal((b, 3, size, size), dtype=np.float32)).to(args.device, dtype)
            dt = timed(lambda: model.get_image_features(pixel_values=px), args.min_time)
            out["pytorch"][str(b)] = b / dt
        for t in [int(x) for x in args.tokens.split(",")]:
            ids = torch.tensor([[49406] + [320] * (t - 2) + [49407]]).to(args.device)
            dt = timed_median(lambda: model.get_text_features(input_ids=ids), args.min_time / 2, 10)
            out["text_ms"][str(t)] = dt * 1000
        if args.parity:
            out["parity"] = parity(model, args.parity, args.device, dtype)
    onnx_path = os.path.join(args.model, "vision.onnx")
    if args.device != "cpu":
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if os.path.exists(onnx_path) and args.device == "cpu":
        import onnxruntime as ort

        out["onnxruntime_version"] = ort.__version__
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        for b in batches:
            px = rng.standard_normal((b, 3, size, size), dtype=np.float32)
            dt = timed(lambda: sess.run(None, {"pixel_values": px}), args.min_time)
            out["onnxruntime"][str(b)] = b / dt
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
