"""Chip pixels -> Qwen2.5-VL ViT input, on the host.

Same layout as transformers' Qwen2-VL image processor (rescale 1/255, CLIP mean/std,
the still image repeated to ``temporal_patch_size`` frames, patches ordered by 2x2 merge
windows), without its resizing: ``geo.chip.to_chip`` has already made the chip square at the
model's size, exactly like the FUSAR-GPT reference (PIL bicubic to 504 x 504). Written out
here rather than calling the processor because the processor needs torchvision for its
default backend and re-decides the size; this stays a few lines of numpy, and a test
compares it with the processor.
"""

from __future__ import annotations

import numpy as np

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def chip_to_patches(chip: np.ndarray, patch_size: int = 14, merge_size: int = 2,
                    temporal_patch_size: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``chip`` uint8 ``[H, W, 3]`` -> ``(pixel_values [N, 3*t*p*p] float32, grid_thw int64 [1, 3])``,
    numpy (the torch model takes them as they are)."""
    if chip.dtype != np.uint8 or chip.ndim != 3 or chip.shape[2] != 3:
        raise ValueError(f"chip: expected uint8 [H, W, 3], got {chip.dtype} {list(chip.shape)}")
    h, w, _ = chip.shape
    unit = patch_size * merge_size
    if h % unit or w % unit:
        raise ValueError(f"chip: sides must be multiples of {unit}, got {h}x{w}")
    img = (chip.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
    img = img.transpose(2, 0, 1)[None]  # [1, C, H, W]
    frames = np.repeat(img, temporal_patch_size, axis=0)  # a still image fills every frame
    gh, gw = h // patch_size, w // patch_size
    x = frames.reshape(1, temporal_patch_size, 3, gh // merge_size, merge_size, patch_size,
                       gw // merge_size, merge_size, patch_size)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    x = x.reshape(gh * gw, 3 * temporal_patch_size * patch_size * patch_size)
    return np.ascontiguousarray(x), np.array([[1, gh, gw]], dtype=np.int64)
