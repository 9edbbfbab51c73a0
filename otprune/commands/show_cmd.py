"""`otprune show IMAGE --out kept.png`: the image with each method's kept patches highlighted."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Draw which image patches each selection method keeps: one panel per method, kept patches bright
with a yellow outline, the others dimmed; each title gives the kept count and ratio and the
exact 2-Wasserstein distance (POT) between all tokens and the kept ones.

Without --model the tokens are a fixed projection of the pixels, so this runs anywhere: the
image is padded to a square with LLaVA-1.5's background colour, resized to GRID*PATCH pixels
(336 by default), cut into GRID x GRID patches (row by row), and every patch's RGB pixels
(scaled to [-1, 1]) are multiplied by a fixed random Gaussian matrix (N(0, 1/DIM) entries,
torch generator seeded with --seed) to DIM dims.

With --model DIR (a LLaVA checkpoint) the tokens are the model's own: the image goes through
llava.mm_utils.process_images and the model's vision tower + projector (model.image_features),
exactly the set pruning sees. LLaVA-1.5: the 24 x 24 grid. LLaVA-1.6 (anyres): the base image
and the grid crops are pruned jointly; a second row of panels shows the grid crops, with the
cells removed by unpadding hatched (the image_newline tokens are counted, not drawn).

PruMerge and PruMerge+ (--methods otprune,prumerge,prumerge_plus) are drawn with --model only:
they need the CLS attention of the model's CLIP tower, which the pixel projection used without
--model does not have (asking for them without --model is an error). Their panels use their
adaptive IQR budget (--ratio is for the selection methods) and show the patches their merged
tokens stand for (LLaVA-1.6: each crop merged on its own; patches of grid cells removed by
unpadding are not drawn); the title counts those patches, and W2 is between all the model's
tokens and PruMerge's merged tokens (its summary token included). VisionZip (--methods visionzip, --model only: its dominant
tokens come from the CLS attention) keeps --ratio of each crop's patches as its dominant patches
plus its contextual tokens; its panel shows the patches those tokens stand for (the CLS row has
no patch). CDPruner is drawn without an instruction (every relevance 1: the unconditional kernel),
as the title line says.

The rules that prune inside the LLM (--methods dart,fastv, --model only) act at a decoder layer
(their default: 2) on what the model computes there: DART on layer 1's keys and the hidden states
entering layer 2, FastV on the prompt's last token's attention. So `show` runs the model's
prefill on the image and a prompt (the vicuna_v1 template around "<image>", a newline and --question, which
DART's text pivots are taken from) with the rule switched on, and draws the visual tokens that
reach the layers after it (DART: its own count, pivots + P x pivots of round(ratio V)); the model
needs more decoder layers than the rule's layer (`otprune tiny-llava DIR --layers 4`). W2 is
between the model's visual tokens (the ones handed to the LLM) and the kept ones among them.
"""

MERGE_METHODS = ("prumerge", "prumerge_plus", "visionzip")
IN_LLM_METHODS = ("dart", "fastv")  # drawn from the model's own pruned prefill (our llava)
DEFAULT_QUESTION = "Describe the image in detail."


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a ratio in (0, 1], e.g. 0.098") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: the ratio must be in (0, 1]")
    return value


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "show",
        help="Picture of the patches each method keeps, with the OT distance",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("image", metavar="IMAGE", help="image file (any format Pillow reads)")
    parser.add_argument("--out", default="kept.png", help="output PNG (default kept.png)")
    parser.add_argument("--methods", default="otprune,divprune,random", help="comma-separated methods, one panel each (default otprune,divprune,random)")
    parser.add_argument("--ratio", type=_ratio, default=0.098, help="share of visual tokens to keep (default 0.098: 56 of 576)")
    parser.add_argument("--model", metavar="DIR", help="LLaVA checkpoint directory: use the model's visual tokens")
    parser.add_argument("--grid", type=int, default=24, help="patches per side without --model (default 24)")
    parser.add_argument("--patch", type=int, default=14, help="patch side in pixels without --model (default 14)")
    parser.add_argument("--dim", type=int, default=256, help="feature dims of the fixed projection without --model (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the projection and of the random method (default 0)")
    parser.add_argument("--gamma", type=float, default=0.01, help="OTPrune's gamma (default 0.01)")
    parser.add_argument("--panel", type=int, default=336, help="panel side in pixels (default 336)")
    parser.add_argument("--question", default=DEFAULT_QUESTION,
                        help=f"the prompt's text after the image, for DART / FastV (default {DEFAULT_QUESTION!r})")
    parser.set_defaults(run=run, needs=("ot", "matplotlib", "PIL"))


def load_model(model_dir: str):
    """(model, image_processor) of a LLaVA checkpoint, on the CPU, in eval mode."""
    from llava.mm_utils import get_model_name_from_path
    from llava.model.builder import load_pretrained_model

    _, model, processor, _ = load_pretrained_model(
        model_dir, None, get_model_name_from_path(model_dir), device_map="cpu", device="cpu", multimodal=True
    )
    return model.eval(), processor


def model_views(model, processor, image):
    """Visual tokens (N, D) of `image` as the model prunes them, and the views they cover."""
    import numpy as np
    import torch
    from llava.mm_utils import get_anyres_image_grid_shape, process_images, unpad_image

    from otprune.analysis.pictures import View, grid_view

    pixels = process_images([image], processor, model.config)[0]  # (3, S, S), or (P, 3, S, S) for anyres
    crops = pixels if pixels.dim() == 4 else pixels[None]  # (P, 3, S, S)
    with torch.inference_mode():  # a batch of one image: (1, 3, S, S) or (1, P, 3, S, S)
        features = model.image_features(pixels[None].to(model.dtype), [image.size])[0].float()  # (N, D)

    mean = torch.tensor(getattr(processor, "image_mean", (0.48145466, 0.4578275, 0.40821073))).view(3, 1, 1)
    std = torch.tensor(getattr(processor, "image_std", (0.26862954, 0.26130258, 0.27577711))).view(3, 1, 1)

    def to_uint8(crop):  # (3, S, S) normalised -> (S, S, 3) uint8, what the vision tower saw
        return (crop.float() * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()

    tower = model.get_vision_tower()
    side = int(tower.num_patches_per_side)
    per_crop = side * side
    n = features.shape[0]
    if crops.shape[0] == 1:
        if n != per_crop:
            raise ValueError(f"--model: {n} visual tokens is not the {side} x {side} patch grid; cannot draw it")
        return features, [grid_view("image", to_uint8(crops[0]), side, side)]

    # LLaVA-1.6 anyres: base crop tokens, then the grid tokens as model.image_features lays them out.
    merge = str(getattr(model.config, "mm_patch_merge_type", "flat"))
    grid_w, grid_h = get_anyres_image_grid_shape(image.size, model.config.image_grid_pinpoints, tower.config.image_size)
    rows, cols = grid_h * side, grid_w * side
    full = torch.arange(rows * cols).view(rows, cols)  # cell index over the stitched crops
    if merge == "flat":
        order = full.view(grid_h, side, grid_w, side).permute(0, 2, 1, 3).flatten()  # crop by crop
    elif merge.startswith("spatial") and "unpad" in merge:
        kept = unpad_image(full[None].float(), image.size)[0].long()  # (rows', cols')
        newline = torch.full((kept.shape[0], 1), -1, dtype=torch.long)
        order = torch.cat([kept, newline], dim=1).flatten()
    elif merge.startswith("spatial"):
        order = full.flatten()
    else:
        raise ValueError(f"--model: mm_patch_merge_type={merge!r} is not supported for drawing")
    if per_crop + order.numel() != n:
        raise ValueError(f"--model: {n} visual tokens, but the anyres layout accounts for {per_crop + order.numel()}")
    base_cells = torch.cat([torch.arange(per_crop), torch.full((order.numel(),), -1)])
    grid_cells = torch.cat([torch.full((per_crop,), -1), order])
    tiles = [to_uint8(c) for c in crops[1:]]
    s = tiles[0].shape[0]
    canvas = np.zeros((grid_h * s, grid_w * s, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, grid_w)
        canvas[r * s : (r + 1) * s, c * s : (c + 1) * s] = tile
    views = [
        View("base image", to_uint8(crops[0]), side, side, base_cells),
        View(f"anyres grid {grid_w}x{grid_h}", canvas, rows, cols, grid_cells),
    ]
    return features, views


def canonical(name: str) -> str:
    """A selection method's or a merge method's (PruMerge) canonical name; ValueError otherwise."""
    from otprune import METHODS
    from otprune.config import canonical_method

    try:
        found = canonical_method(name)
    except ValueError:
        found = None
    return found if found in MERGE_METHODS + IN_LLM_METHODS else METHODS.canonical(name)


def in_llm_selection(model, processor, image, method: str, ratio: float, question: str = DEFAULT_QUESTION):
    """Indices (ascending) of the image's visual tokens (the model's set, `model_views`' order) that
    the in-LLM rule `method` (DART, FastV) keeps at its default layer, from the model's own prefill
    of `image` + `question` (vicuna_v1 template) with the rule switched on."""
    import torch
    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token

    from otprune.config import PruneConfig

    tokenizer = getattr(model, "instruction_tokenizer", None)
    if tokenizer is None:
        raise ValueError(f"--methods {method}: the model has no tokenizer attached (load it with load_pretrained_model)")
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], f"{DEFAULT_IMAGE_TOKEN}\n{question}")
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    pixels = process_images([image], processor, model.config)[0]
    config = PruneConfig(method=method, ratio=ratio)  # the rule's default layer
    if config.layer >= model.config.num_hidden_layers:
        raise ValueError(f"--methods {method}: acts at decoder layer {config.layer}, but the model has "
                         f"{model.config.num_hidden_layers} layers; draw it on a deeper model (e.g. otprune tiny-llava DIR --layers 4)")
    previous = getattr(model, "_prune_override", None)
    model.set_pruning(config)
    try:
        with torch.inference_mode():
            model(input_ids=ids.to(model.device), images=pixels[None].to(model.device, model.dtype),
                  image_sizes=[image.size], use_cache=False)  # fmt: skip
    finally:
        model.set_pruning(previous)
    (start, end), = model.visual_layout.spans[0]
    last = model.pruned_layout.stages[-1]  # the rows the layers after the rule see
    rows = last.source[0][last.valid[0]].cpu()
    return (rows[(rows >= start) & (rows < end)] - start).sort().values


def merge_selection(model, processor, image, method: str, views, ratio: float | None = None) -> tuple:
    """(indices of the tokens of `views` whose patches PruMerge's merged tokens stand for, the
    merged tokens (M, D)) for `method` in MERGE_METHODS, adaptive budget, on the model's tower."""
    import torch
    from llava.mm_utils import process_images

    from otprune.config import PruneConfig

    pixels = process_images([image], processor, model.config)[0]
    with torch.inference_mode():
        config = PruneConfig(method=method, layer=0, ratio=ratio if method == "visionzip" else None)
        tokens, sources, _, _ = model.merged_image_features(pixels[None].to(model.dtype), config)
    patches = sources[0][sources[0] >= 0].tolist()  # crop c's patch p is c * N + p
    side = int(model.get_vision_tower().num_patches_per_side)
    n = side * side
    if len(views) == 1:
        return torch.tensor(sorted(patches), dtype=torch.long), tokens[0].float()
    cells = views[1].cells
    token_of_cell = {int(c): t for t, c in enumerate(cells.tolist()) if c >= 0}
    grid_w = views[1].cols // side
    kept = set()
    for source in patches:
        crop, p = divmod(source, n)
        if crop == 0:
            kept.add(p)  # the base image's tokens come first
            continue
        r, c = divmod(crop - 1, grid_w)
        cell = (r * side + p // side) * views[1].cols + c * side + p % side
        if cell in token_of_cell:  # not removed by unpadding
            kept.add(token_of_cell[cell])
    return torch.tensor(sorted(kept), dtype=torch.long), tokens[0].float()


def run(args) -> int:
    from pathlib import Path

    from PIL import Image, UnidentifiedImageError

    from otprune import select_tokens
    from otprune.analysis.distances import wasserstein2, wasserstein2_between
    from otprune.analysis.pictures import grid_view, patch_features, render

    methods = [canonical(m) for m in args.methods.split(",") if m.strip()]
    merging = [m for m in methods if m in MERGE_METHODS]
    if merging and not args.model:
        raise ValueError(
            f"--methods={args.methods!r}: {', '.join(merging)} need the CLS attention of a CLIP vision tower; draw "
            "them with --model DIR (a LLaVA checkpoint): the pixel projection used without --model has no CLS token"
        )
    in_llm = [m for m in methods if m in IN_LLM_METHODS]
    if in_llm and not args.model:
        raise ValueError(
            f"--methods={args.methods!r}: {', '.join(in_llm)} prune inside the LLM, from what its decoder layers compute; "
            "draw them with --model DIR (a LLaVA checkpoint with more decoder layers than the rule's layer, 2)"
        )
    if not methods:
        raise ValueError(f"--methods={args.methods!r}: name at least one method")
    if len(set(methods)) != len(methods):
        raise ValueError(f"--methods={args.methods!r}: a method is listed twice")
    if args.panel < 16:
        raise ValueError(f"--panel={args.panel}: must be >= 16 pixels")
    if not args.gamma > 0:
        raise ValueError(f"--gamma={args.gamma}: must be > 0")
    path = Path(args.image)
    if not path.is_file():
        raise FileNotFoundError(f"IMAGE {args.image}: no such file")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"IMAGE {args.image}: not an image Pillow can read ({err})") from None
    image = image.convert("RGB")

    if args.model:
        if not Path(args.model).is_dir():
            raise FileNotFoundError(f"--model {args.model}: not a directory")
        model, processor = load_model(args.model)
        features, views = model_views(model, processor, image)
        source = f"model {args.model}"
    else:
        pixels, features = patch_features(image, args.grid, args.patch, args.dim, args.seed)
        views = [grid_view("image", pixels, args.grid, args.grid)]
        source = f"fixed projection ({args.grid}x{args.grid} patches of {args.patch} px -> {args.dim} dims, seed {args.seed})"

    params = {"otprune": {"gamma": args.gamma}, "random": {"seed": args.seed}}
    selections, distances = {}, {}
    merged = {}
    for method in methods:
        if method in MERGE_METHODS:  # the patches its merged tokens stand for; W2 to the merged tokens
            kept, merged[method] = merge_selection(model, processor, image, method, views, args.ratio)
            distances[method] = wasserstein2_between(features, merged[method])
        else:
            if method in IN_LLM_METHODS:  # the model's own prefill with the rule at its layer
                kept = in_llm_selection(model, processor, image, method, args.ratio, args.question)
            else:
                kept = select_tokens(features, args.ratio, method, **params.get(method, {}))
            distances[method] = wasserstein2(features, kept)
        selections[method] = kept
    figure, _ = render(views, selections, distances, panel=args.panel)
    out = Path(args.out)
    if out.parent and not out.parent.exists():
        raise FileNotFoundError(f"--out {args.out}: directory {out.parent} does not exist")
    from otprune.eval import atomic

    with atomic.replacing(out) as temporary:  # random temporary name, renamed into place, never through a link
        figure.save(temporary, format=(out.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"))
    n = features.shape[0]
    print(f"{args.image}: {n} visual tokens from {source}; keeping ratio {args.ratio}")
    for method in methods:
        budget = "--ratio" if method == "visionzip" else "adaptive budget"
        extra = f" ({merged[method].shape[0]} merged tokens, {budget})" if method in merged else ""
        extra += " (no instruction: every relevance 1)" if method == "cdpruner" else ""
        if method in IN_LLM_METHODS:
            from otprune.config import PruneConfig

            extra += f" (inside the LLM at layer {PruneConfig(method=method, ratio=args.ratio).layer}, the model's prefill)"
        print(f"  {method:<9} kept {selections[method].numel():>4}/{n}  W2 = {distances[method]:.6g}{extra}")
    print(f"wrote {out} ({figure.width}x{figure.height})")
    return 0
