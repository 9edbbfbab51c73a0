"""`otprune tiny-llava DIR [--v16] [--seed N]`: write a tiny random-weight LLaVA checkpoint."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Write a tiny random-weight LLaVA checkpoint in the original format (config.json with the mm_*
keys, safetensors weights, a sentencepiece Llama tokenizer trained locally, and a CLIP vision
tower directory with its preprocessor config). It loads on a CPU with no network:

  from llava.model.builder import load_pretrained_model
  tokenizer, model, image_processor, _ = load_pretrained_model(DIR, None, "tiny-llava", device_map="cpu")

Use it to smoke-test an install, e.g. `LAYER_INDEX=0 SUBSET_RATIO=0.25 lmms-eval --model llava
--model_args pretrained=DIR,device_map=auto,device=cpu ...`. The outputs are gibberish: the
weights are random (but the same for the same --seed).
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tiny-llava",
        help="Write a tiny random-weight LLaVA checkpoint (for tests and smoke tests)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dir", metavar="DIR", help="output directory (created; a name containing 'llava' is recommended)")
    parser.add_argument("--v16", action="store_true", help="LLaVA-1.6 layout: anyres crops, unpad, image_newline")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokenizer corpus (default 0)")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (default 2; >= 3 to try FastV at its default LAYER_INDEX=2)")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads: 4 (default), 2 or 1 (grouped-query)")
    parser.set_defaults(run=run, needs=("transformers", "sentencepiece", "PIL"))


def run(args) -> int:
    from llava.tiny import write_tiny_llava

    folder = write_tiny_llava(args.dir, v16=args.v16, seed=args.seed, layers=args.layers, kv_heads=args.kv_heads)
    kind = "LLaVA-1.6 (anyres)" if args.v16 else "LLaVA-1.5"
    print(f"wrote a tiny {kind} checkpoint to {folder}")
    if "llava" not in folder.resolve().name.lower():
        print("note: the original LLaVA code only treats a checkpoint as LLaVA when its name contains 'llava'")
    return 0
