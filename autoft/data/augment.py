"""Batched augmentation and the eval transform, on the compute device."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# --- batched augmentation on the compute device ----------------------------------------------------------


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The eval transform on stored images: the central size x size square, as float in [0, 1]."""
    off = (x.shape[-1] - size) // 2
    return x[..., off : off + size, off : off + size].float().div_(255)


def augment(
    x: torch.Tensor, size: int, strength: float, generator: torch.Generator | None = None, force: bool = False
) -> torch.Tensor:
    """Per-sample random-resized crop, flip, rotation and colour jitter, all scaled by one dial.

    strength 0 is the eval transform exactly (`force` runs the general path anyway, for tests);
    strength 1 is torchvision's RandomResizedCrop range (scale 0.08-1, ratio 3/4-4/3), flip p=0.5,
    rotation +-30 degrees and brightness/contrast/saturation jitter 0.4. One affine grid_sample does
    crop, flip and rotation for the whole batch.
    """
    if strength == 0 and not force:
        return center_crop(x, size)
    b, dev, s = x.shape[0], x.device, float(strength)

    def u(lo, hi):
        return torch.rand(b, device=dev, generator=generator) * (hi - lo) + lo

    a0 = (size / x.shape[-1]) ** 2
    area = u(a0 - s * (a0 - 0.08), a0 + s * (1 - a0))
    log_r = u(-s * math.log(4 / 3), s * math.log(4 / 3)).exp()
    w = (area * log_r).sqrt().clamp(max=1.0)
    h = (area / log_r).sqrt().clamp(max=1.0)
    cx, cy = s * (1 - w) * u(-1, 1), s * (1 - h) * u(-1, 1)
    flip = torch.where(u(0, 1) < 0.5 * s, -1.0, 1.0)
    angle = u(-30 * s, 30 * s) * (math.pi / 180)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack(
        [torch.stack([w * flip * cos, -h * sin, cx], 1), torch.stack([w * flip * sin, h * cos, cy], 1)], 1
    )
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    out = F.grid_sample(x.float().div_(255), grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if s > 0:
        j = 0.4 * s
        out = out * u(1 - j, 1 + j).view(b, 1, 1, 1)
        gray = (out * torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
        mean = gray.mean((2, 3), keepdim=True)
        out = (out - mean) * u(1 - j, 1 + j).view(b, 1, 1, 1) + mean
        gray = (out * torch.tensor([0.299, 0.587, 0.114], device=dev).view(1, 3, 1, 1)).sum(1, keepdim=True)
        out = (out - gray) * u(1 - j, 1 + j).view(b, 1, 1, 1) + gray
    return out.clamp_(0, 1)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    sd = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / sd
