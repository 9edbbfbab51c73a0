"""scripts/serve_venv_fixup.py's video-processor stand-ins (issue 22, point 7), applied to a fresh copy of
transformers' original files (kept as `*.py.orig` in the serve venv): the result equals what the serve
venv holds, and a second run changes nothing (CI builds the venv from scratch, developers re-apply it)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin tests run in the serve venv (make test-serve)")

ROOT = Path(__file__).resolve().parents[2]
FILES = ["utils/dummy_torchvision_objects.py", "models/qwen2_vl/video_processing_qwen2_vl.py",
         "models/qwen3_vl/video_processing_qwen3_vl.py",
         "models/llava_onevision/video_processing_llava_onevision.py", "models/internvl/video_processing_internvl.py",
         "models/auto/video_processing_auto.py"]  # fmt: skip


def test_video_stand_ins_from_scratch_equal_the_venv_and_are_idempotent(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import serve_venv_fixup as fixup
    finally:
        sys.path.pop(0)
    if fixup.torchvision_works():
        pytest.skip("torchvision works in this venv: the fixup does nothing")
    venv = Path(importlib.util.find_spec("transformers").origin).parent
    fresh = tmp_path / "transformers"
    for name in FILES:
        original = venv / (name + ".orig")
        assert original.exists(), f"{original}: the fixup keeps each original beside its shim"
        (fresh / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(original, fresh / name)
    assert fixup.fix_videos(fresh) == 0
    made = sorted(p.relative_to(fresh).as_posix() for p in fresh.rglob("*.py"))
    for name in made:
        assert (fresh / name).read_text() == (venv / name).read_text(), name
    assert {"models/qwen2_vl/torchless_video_qwen2_vl.py", "models/qwen3_vl/torchless_video_qwen3_vl.py",
            "otprune_torchless_video.py", "models/internvl/torchless_video_internvl.py",
            "models/auto/torchless_video_auto.py"} <= set(made)
    capsys.readouterr()
    snapshot = {name: (fresh / name).read_text() for name in made}
    assert fixup.fix_videos(fresh) == 0
    assert "(already)" in capsys.readouterr().out
    assert {name: (fresh / name).read_text() for name in made} == snapshot
