"""The torchvision operations of transformers' video processors, in plain torch (for the serve venv).

transformers 5.x processes videos through `BaseVideoProcessor`, whose image operations come from
`TorchvisionBackend` (`torchvision.transforms.v2.functional`). The serve venv has no torchvision
(scripts/serve_venv_fixup.py), so the fixup copies this file into transformers as
`transformers/otprune_torchless_video.py` and makes the Qwen2-VL / Qwen3-VL video processors
subclass `TorchlessBaseVideoProcessor` instead of `BaseVideoProcessor`: their own code (frame
sampling, `smart_resize`, the fused rescale + normalize, temporal patch grouping) runs unchanged,
and the three operations that called torchvision are the ones below, computed as torchvision
0.29's tensor kernels compute them (`F.interpolate` with antialias, uint8 kept on the CPU where
torchvision keeps it; `(x - mean) / std`). tests/serve/test_torchless_video.py compares the result
with transformers' real processors in the main venv (torchvision installed).

Only what the Qwen processors use is covered: `resize` to an explicit (height, width), RGB or
grayscale frames; anything else raises a ValueError naming the argument.
"""

from __future__ import annotations

import platform

import torch
from torch.nn import functional as F
from transformers.image_utils import PILImageResampling
from transformers.video_processing_utils import BaseVideoProcessor

# PIL resampling filter -> F.interpolate mode (torchvision's mapping for these three)
MODES = {
    PILImageResampling.NEAREST: "nearest-exact",
    PILImageResampling.BILINEAR: "bilinear",
    PILImageResampling.BICUBIC: "bicubic",
}


def native_uint8(mode: str, device: torch.device) -> bool:
    """Whether torchvision resizes a uint8 tensor in uint8 (else: float32, round, back to uint8)."""
    if mode == "nearest-exact":
        return True
    if device.type != "cpu":
        return False
    if mode == "bilinear":
        return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")
    return mode == "bicubic"


def resize_frames(frames: torch.Tensor, height: int, width: int, resample=PILImageResampling.BILINEAR,
                  antialias: bool = True) -> torch.Tensor:  # fmt: skip
    """frames: (..., C, H, W) -> (..., C, height, width), as torchvision's `resize` on a tensor."""
    try:
        mode = MODES[PILImageResampling(int(resample))]
    except (KeyError, ValueError, TypeError):
        raise ValueError(
            f"resample={resample!r}: the torchless video backend resizes with NEAREST, BILINEAR or BICUBIC only"
        ) from None
    *lead, channels, old_height, old_width = frames.shape
    if (old_height, old_width) == (height, width):
        return frames
    if frames.numel() == 0:
        return frames.new_empty((*lead, channels, height, width))
    dtype = frames.dtype
    flat = frames.reshape(-1, channels, old_height, old_width)
    cast = dtype not in (torch.float32, torch.float64) and not (dtype == torch.uint8 and native_uint8(mode, frames.device))
    if cast:
        flat = flat.to(torch.float32)
    aligned = False if mode in ("bilinear", "bicubic") else None
    out = F.interpolate(flat, size=[height, width], mode=mode, align_corners=aligned,
                        antialias=antialias if mode != "nearest-exact" else False)  # fmt: skip
    if cast:
        if mode == "bicubic" and dtype == torch.uint8:
            out = out.clamp_(0, 255)
        if not dtype.is_floating_point:
            out = out.round_()
        out = out.to(dtype)
    return out.reshape(*lead, channels, height, width)


class TorchlessBaseVideoProcessor(BaseVideoProcessor):
    """`BaseVideoProcessor` with its torchvision operations (`convert_to_rgb`, `resize`, `normalize`) in torch."""

    def convert_to_rgb(self, video: torch.Tensor) -> torch.Tensor:
        """video: (T, C, H, W) with C = 3 (returned as is) or 1 (repeated)."""
        channels = video.shape[-3]
        if channels == 3:
            return video
        if channels == 1:
            return video.repeat_interleave(3, dim=-3)
        raise ValueError(f"video: {channels} channels per frame; the torchless video backend takes RGB or grayscale frames")

    def resize(self, image: torch.Tensor, size, resample=None, antialias: bool = True, **kwargs) -> torch.Tensor:
        """image: (..., C, H, W) -> (..., C, size.height, size.width)."""
        if not (size.height and size.width):
            raise ValueError(f"size={size}: the torchless video backend resizes to an explicit height and width only")
        return resize_frames(image, int(size.height), int(size.width),
                             PILImageResampling.BILINEAR if resample is None else resample, antialias)  # fmt: skip

    def normalize(self, image: torch.Tensor, mean, std, inplace: bool = False, **kwargs) -> torch.Tensor:
        """image: (..., C, H, W) float -> (image - mean) / std per channel."""
        mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
        if not inplace:
            image = image.clone()
        return image.sub_(mean).div_(std)


__all__ = ["TorchlessBaseVideoProcessor", "resize_frames"]
