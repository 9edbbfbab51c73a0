"""scripts/serve_venv_fixup.py's torchless Qwen2-VL / Qwen3-VL video processors against transformers'
real (torchvision) ones, in the MAIN venv (torchvision installed; skipped where it is not).

The stand-in module is made by the fixup's own `torchless_text` from this venv's transformers source
and loaded beside the real one; both process the same random uint8 frames (several sizes, frame
counts even and odd, a grayscale video, frame sampling on and off). The grids are equal and
`pixel_values_videos` agree within float tolerance (the resize kernels are the same `F.interpolate`
calls; only summation order may differ)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torchvision.transforms.v2", reason="compares with transformers' torchvision video processors")
pytest.importorskip("transformers")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def load(name: str, path: Path, package: str | None = None, text: str | None = None):
    spec = importlib.util.spec_from_loader(name, loader=None) if text is not None else importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    if package is not None:
        module.__package__ = package
    sys.modules[name] = module
    if text is not None:
        module.__file__ = str(path)  # transformers' auto_docstring inspects the class's source file
        exec(compile(text, str(path), "exec"), module.__dict__)
    else:
        spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def torchless():
    try:
        import torchvision.ops  # noqa: F401
    except Exception as error:  # a torchvision that does not load beside this torch (the serve venv)
        pytest.skip(f"torchvision does not load here: {error}")
    fixup = load("serve_venv_fixup_for_test", ROOT / "scripts" / "serve_venv_fixup.py")
    import transformers

    root = Path(transformers.__file__).parent
    load(f"transformers.{fixup.BACKEND_MODULE}", fixup.BACKEND)
    out = {}
    for name in fixup.TORCHLESS:
        module, cls = fixup.VIDEO_STAND_INS[name]
        source = (root / "models" / name / f"{module}.py").read_text()
        text = fixup.torchless_text(source, cls)
        package = f"transformers.models.{name}"
        stand_in = load(f"{package}._otprune_torchless_test", root / "models" / name / f"{module}.py", package, text)
        real = getattr(importlib.import_module(f"{package}.{module}"), cls)
        out[name] = (getattr(stand_in, cls), real)
    yield out
    for key in [k for k in sys.modules if k.endswith("_otprune_torchless_test") or k.endswith(fixup.BACKEND_MODULE)]:
        del sys.modules[key]


def frames(seed: int, count: int, height: int, width: int, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, channels), dtype=np.uint8)


CASES = [  # (seed, frames, height, width, channels, processor kwargs)
    (0, 4, 60, 80, 3, {}),
    (1, 3, 123, 77, 3, {}),
    (2, 8, 224, 320, 3, {"size": {"shortest_edge": 3136, "longest_edge": 8 * 224 * 224}}),
    (3, 2, 90, 50, 1, {}),
    (4, 12, 64, 96, 3, {"do_sample_frames": True, "num_frames": 6, "fps": None}),
]


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_torchless_video_processing_equals_transformers(torchless, name, case):
    stand_in, real = torchless[name]
    assert stand_in is not real and stand_in.__mro__[1].__name__ == "TorchlessBaseVideoProcessor"
    seed, count, height, width, channels, kwargs = case
    videos = [frames(seed, count, height, width, channels), frames(seed + 10, count, height + 28, width, channels)]
    common = {"return_tensors": "pt", **kwargs}
    if name == "qwen3_vl":
        common["cap_pixels_per_frame"] = False
    if kwargs.get("do_sample_frames"):
        from transformers.video_utils import VideoMetadata

        common["video_metadata"] = [VideoMetadata(total_num_frames=count, fps=4.0, duration=count / 4.0) for _ in videos]
    ours = stand_in()(videos=videos, **common)
    theirs = real()(videos=videos, **common)
    assert set(ours.keys()) == set(theirs.keys()) >= {"pixel_values_videos", "video_grid_thw"}
    assert torch.equal(ours["video_grid_thw"], theirs["video_grid_thw"])
    assert ours["pixel_values_videos"].shape == theirs["pixel_values_videos"].shape
    diff = (ours["pixel_values_videos"] - theirs["pixel_values_videos"]).abs().max().item()
    assert diff < 1e-5, f"{name} case {case[:5]}: max abs diff {diff}"
    for key in set(ours.keys()) - {"pixel_values_videos", "video_grid_thw"}:
        assert str(ours[key]) == str(theirs[key]), key


def test_resize_frames_equals_torchvision_on_uint8_and_float(torchless):
    from torchvision.transforms.v2 import functional as tvF
    from transformers.image_utils import PILImageResampling

    backend = sys.modules[[k for k in sys.modules if k.endswith("otprune_torchless_video")][0]]
    x = torch.from_numpy(frames(7, 3, 45, 71)).permute(0, 3, 1, 2).contiguous()
    for resample, mode in ((PILImageResampling.BICUBIC, tvF.InterpolationMode.BICUBIC),
                           (PILImageResampling.BILINEAR, tvF.InterpolationMode.BILINEAR),
                           (PILImageResampling.NEAREST, tvF.InterpolationMode.NEAREST_EXACT)):  # fmt: skip
        for tensor in (x, x.float() / 255.0):
            for size in ((28, 56), (90, 140)):
                ours = backend.resize_frames(tensor, *size, resample)
                theirs = tvF.resize(tensor, list(size), interpolation=mode, antialias=True)
                assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
                assert (ours.float() - theirs.float()).abs().max().item() <= (1e-5 if tensor.is_floating_point() else 0)
