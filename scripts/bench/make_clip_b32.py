#!/usr/bin/env python3
"""Full-size random-weight CLIP checkpoints for benchmarks (never committed).

Writes a Hugging Face directory with the exact shapes of a real checkpoint
(default: openai/clip-vit-base-patch32) and random weights, the real CLIP tokenizer,
the processor config, and `vision.onnx` (the vision tower + projection, for the ONNX
Runtime peer).

    python3 scripts/bench/make_clip_b32.py bench-data/clip-vit-base-patch32
    python3 scripts/bench/make_clip_b32.py bench-data/clip-vit-large-patch14 --large

Needs torch, transformers, safetensors (onnx for the export).
"""
import argparse
import os
import shutil
import sys

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "..", "tests", "fixtures", "clip", "tokenizer.json")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--large", action="store_true", help="ViT-L/14 shapes instead of ViT-B/32")
    ap.add_argument("--no-onnx", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.large:
        cfg = CLIPConfig(
            text_config=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                               num_hidden_layers=24, patch_size=14, image_size=224),
            projection_dim=768,
        )
    else:
        cfg = CLIPConfig(projection_dim=512)  # transformers' defaults are ViT-B/32's shapes
    cfg.text_config.eos_token_id = 2  # as the openai checkpoints: argmax pooling
    model = CLIPModel(cfg).eval()
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    CLIPImageProcessor().save_pretrained(args.out)
    shutil.copy(TOKENIZER, os.path.join(args.out, "tokenizer.json"))
    if not args.no_onnx:
        class Vision(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, pixel_values):
                return self.m.get_image_features(pixel_values=pixel_values)

        size = cfg.vision_config.image_size
        torch.onnx.export(
            Vision(model), (torch.randn(1, 3, size, size),), os.path.join(args.out, "vision.onnx"),
            input_names=["pixel_values"], output_names=["image_embeds"],
            dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}}, opset_version=17,
            dynamo=False,
        )
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {n / 1e6:.1f} M parameters", file=sys.stderr)


if __name__ == "__main__":
    main()
