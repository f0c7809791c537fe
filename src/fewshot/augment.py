"""Augmentation as batched tensor code (no torchvision).

Transforms take ``(x, generator)`` with ``x`` float ``[B, M, C, H, W]`` and return the same shape; they
draw their randomness from the sampler's generator so a seeded run is reproducible and resumable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class RandomAffine:
    """Small label-preserving random affine jitter: rotation (degrees), scale, shear (degrees) and
    translation (fraction of the size), drawn independently per image; borders are filled with 0."""

    degrees: float = 10.0
    scale: tuple = (0.9, 1.1)
    shear: float = 5.0
    translate: float = 0.1

    def matrices(self, n: int, generator: torch.Generator, device, dtype) -> torch.Tensor:
        u = torch.rand(n, 5, generator=generator, device=device, dtype=torch.float32)
        rot = (u[:, 0] * 2 - 1) * math.radians(self.degrees)
        sc = self.scale[0] + u[:, 1] * (self.scale[1] - self.scale[0])
        sh = (u[:, 2] * 2 - 1) * math.radians(self.shear)
        tx = (u[:, 3] * 2 - 1) * self.translate * 2     # grid coordinates span [-1, 1]
        ty = (u[:, 4] * 2 - 1) * self.translate * 2
        cos, sin = torch.cos(rot), torch.sin(rot)
        # inverse map (output -> input coordinates): rotate, shear, then divide by the scale
        a = torch.stack([torch.stack([cos, -sin + torch.tan(sh) * cos], -1),
                         torch.stack([sin, cos + torch.tan(sh) * sin], -1)], -2) / sc[:, None, None]
        t = torch.stack([tx, ty], -1).unsqueeze(-1)
        return torch.cat([a, t], -1).to(dtype)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        shp = x.shape
        flat = x.reshape(-1, *shp[-3:])
        theta = self.matrices(flat.shape[0], generator, x.device, flat.dtype)
        grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
        return F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False).reshape(shp)


def build_transform(spec: dict | None):
    """A transform from a config mapping, e.g. ``{"affine": {"degrees": 10}}``; ``None``/{} -> no transform."""
    if not spec:
        return None
    spec = dict(spec)
    aff = spec.pop("affine", None)
    if spec:
        raise ValueError(f"unknown augmentation(s): {', '.join(spec)}; known: affine")
    if aff is None or aff is False:
        return None
    return RandomAffine(**({} if aff is True else aff))
