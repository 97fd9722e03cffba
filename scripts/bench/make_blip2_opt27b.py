#!/usr/bin/env python3
"""Random-weight BLIP-2 OPT-2.7b checkpoints with the real layer shapes, for benchmarks
(never committed).

Every tensor has the shape it has in `Salesforce/blip2-opt-2.7b` (ViT-g 1408 wide,
Q-Former 768 wide with 32 queries, OPT 2560 wide with a 50,272-token vocabulary), but
the vision encoder and the language model keep only `--layers` layers each, so that
`cargo bench --bench blip2` can measure two depths and extrapolate per layer to the
full 39 + 32 layers (the full model is 3.9 B parameters: 15.5 GB in f32, more than
this machine can hold twice, once for each side of the comparison).

    python3 scripts/bench/make_blip2_opt27b.py bench-data/blip2-opt-2.7b-L2 --layers 2
    python3 scripts/bench/make_blip2_opt27b.py bench-data/blip2-opt-2.7b-L4 --layers 4
    python3 scripts/bench/make_blip2_opt27b.py bench-data/blip2-opt-2.7b --layers 0   # all layers

The tokenizer is the fixtures' small byte-level BPE (no package ships OPT's vocabulary);
its ids are all below 50,272, and `image_token_index` is its `<image>` token.

Needs torch, transformers, safetensors.
"""
import argparse
import json
import os
import shutil
import sys

import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration, BlipImageProcessor

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "..", "tests", "fixtures", "blip2")

VISION_LAYERS = 39  # ViT-g
TEXT_LAYERS = 32  # OPT-2.7b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=2,
                    help="vision and language layers to keep (0 = all: 39 and 32)")
    args = ap.parse_args()
    torch.manual_seed(0)
    tok = json.load(open(os.path.join(FIXTURES, "tokenizer.json")))
    image_id = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<image>")
    vl = args.layers or VISION_LAYERS
    tl = args.layers or TEXT_LAYERS
    cfg = Blip2Config(
        # Blip2VisionConfig's defaults are ViT-g's shapes (1408 wide, 6144 MLP, 16 heads,
        # patch 14 at 224); Blip2QFormerConfig's are BLIP-2's Q-Former.
        vision_config=dict(num_hidden_layers=vl),
        qformer_config=dict(),
        text_config=dict(
            model_type="opt", vocab_size=50272, hidden_size=2560, ffn_dim=10240, num_attention_heads=32,
            num_hidden_layers=tl, max_position_embeddings=2048, word_embed_proj_dim=2560,
            do_layer_norm_before=True, activation_function="relu", enable_bias=True,
            bos_token_id=2, eos_token_id=50118, pad_token_id=1, tie_word_embeddings=True,
        ),
        num_query_tokens=32,
        image_token_index=image_id,
    )
    model = Blip2ForConditionalGeneration(cfg).eval()
    # Blip2VisionConfig's initializer_range is 1e-10: its layers would add nothing to the
    # residual stream, which is fine for timing but hides every numerical error. Give the
    # vision tower's weights N(0, 1/fan_in) and its embeddings unit scale instead, so that
    # precision probes on these checkpoints mean something.
    with torch.no_grad():
        for name, p in model.vision_model.named_parameters():
            if name.endswith(".weight") and p.dim() >= 2:
                fan_in = p[0].numel()
                p.normal_(0.0, fan_in ** -0.5)
            elif "embedding" in name:
                p.normal_(0.0, 1.0)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True, max_shard_size="2GB")
    BlipImageProcessor(size={"height": 224, "width": 224}).save_pretrained(args.out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(FIXTURES, f), os.path.join(args.out, f))
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {vl} vision + {tl} language layers, {n / 1e6:.1f} M parameters", file=sys.stderr)


if __name__ == "__main__":
    main()
