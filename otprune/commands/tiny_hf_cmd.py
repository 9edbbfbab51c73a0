"""`otprune tiny-hf DIR --family FAMILY [--seed N]` (FAMILY: a name of `otprune.hf.FAMILIES`): a tiny HF-format checkpoint."""

from __future__ import annotations

import argparse

from otprune.hf import FAMILIES

DESCRIPTION = """\
Write a tiny random-weight checkpoint of one of transformers' own multimodal model classes, with
its processor (a byte-level tokenizer built locally, the family's image processor at a small
image size, a chat template). It loads on a CPU with no network:

  from transformers import AutoProcessor, LlavaForConditionalGeneration
  processor = AutoProcessor.from_pretrained(DIR)
  model = LlavaForConditionalGeneration.from_pretrained(DIR)

and prunes with `otprune.hf.apply(model, config)`. Use it to smoke-test an install, e.g.
`LAYER_INDEX=0 SUBSET_RATIO=0.25 lmms-eval --model llava_hf --model_args pretrained=DIR,device=cpu ...`
(lmms-eval's own model name, pruned by the switches; `--model qwen2_5_vl` for --family qwen2_5_vl). The outputs are gibberish: the weights are random (the same for
the same --seed).
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tiny-hf",
        help=f"Write a tiny random-weight HF-format checkpoint with a processor ({', '.join(FAMILIES)})",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dir", metavar="DIR", help="output directory (created)")
    parser.add_argument("--family", required=True, choices=list(FAMILIES), help="model family")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from otprune.hf import tiny_writer

    folder = tiny_writer(args.family)(args.dir, seed=args.seed)
    print(f"wrote a tiny {FAMILIES[args.family].model_class} checkpoint (with its processor) to {folder}")
    return 0
