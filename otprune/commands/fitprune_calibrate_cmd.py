"""`otprune fitprune-calibrate`: compute a FitPrune recipe for a LLaVA checkpoint.

    otprune fitprune-calibrate --model liuhaotian/llava-v1.5-7b --data calib.jsonl --reduction 0.6 --out recipe.json
    FITPRUNE_RECIPE=recipe.json BASELINE=FITPRUNE python -m lmms_eval --model llava ...
"""

from __future__ import annotations

import argparse

DESCRIPTION = """\
FitPrune (AAAI 2025): run the model unpruned on a small calibration set, record per decoder layer
the attention the visual tokens receive (self attention from the visual tokens, cross attention
from the text after the image; averaged over heads and samples), and find the per-layer numbers
of visual tokens to drop that remove --reduction of the decoder FLOPs (4nd^2 + 2n^2d + 2ndm per
layer, with the model's own sizes) with the least attention loss: the smallest threshold a such
that dropping, at every layer, only tokens whose lost attention mass (self or cross, layer's own
attention) stays <= a meets the budget. Tokens dropped at a layer stay dropped; layer 0 keeps all.

--data is JSONL, one {"image": PATH, "question": TEXT} per line (paths relative to the file).
Apply the recipe with FITPRUNE_RECIPE=recipe.json BASELINE=FITPRUNE (LAYER_INDEX optional).
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "fitprune-calibrate",
        help="compute a FitPrune pruning recipe (per-layer visual-token drops) for a FLOPs budget",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="LLaVA checkpoint: local directory or hub id")
    parser.add_argument("--data", required=True, help='calibration JSONL: {"image": path, "question": text} per line')
    parser.add_argument("--reduction", type=float, default=0.6,
                        help="fraction of the decoder FLOPs to remove, in (0, 1) (default 0.6)")
    parser.add_argument("--out", required=True, help="where to write the recipe (JSON)")
    parser.add_argument("--conv-mode", default="vicuna_v1", help="conversation template of the prompts (default vicuna_v1)")
    parser.add_argument("--device", default=None, help="device map for loading the model (default: cuda if available, else cpu)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run, needs=("transformers", "sentencepiece", "PIL"))


def run(args) -> int:
    if not 0.0 < args.reduction < 1.0:
        raise ValueError(f"--reduction={args.reduction}: must be in (0, 1), the fraction of the decoder FLOPs to remove")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit={args.limit}: must be >= 1")
    from llava.calibrate import calibrate

    from otprune.flops import compact_schedule
    from otprune.methods.fitprune import save_recipe

    recipe = calibrate(args.model, args.data, args.reduction, conv_mode=args.conv_mode, device=args.device,
                       limit=args.limit, progress=not args.no_progress)
    out = save_recipe(recipe, args.out)
    print(f"wrote {out}: {recipe.calibration.get('samples')} samples, {recipe.num_layers} layers, "
          f"{recipe.visual_tokens} visual + {recipe.text_tokens} text tokens")
    print(f"visual tokens per layer: {compact_schedule(recipe.kept)}")
    print(f"FLOPs reduction {recipe.achieved_reduction:.2%} (asked {recipe.reduction:.2%}); "
          f"largest attention loss {recipe.max_attention_loss:.4f}")
    return 0
