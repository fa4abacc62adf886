"""SAR image to model chip: step 4 of the normalisation contract in ``geo.sar``.

``render`` turns a ``SarImage`` (already normalised by ``read_sar``) into its full-size 8-bit
rendering; ``to_chip`` resizes that to the model's square chip exactly as the FUSAR-GPT
reference does (PIL bicubic, aspect ratio not kept).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ..errors import InputError
from .sar import SarImage


def render(img: SarImage) -> Image.Image:
    """The full-size 8-bit rendering: ``"RGB"`` for visual images, ``"L"`` for radar data."""
    if img.kind == "visual8":
        return Image.fromarray(img.data, "RGB")
    return Image.fromarray(np.rint(np.clip(img.data, 0.0, 1.0) * 255.0).astype(np.uint8), "L")


def to_chip(img: SarImage, size: int) -> np.ndarray:
    """uint8 ``[size, size, 3]``: the rendering resized with PIL bicubic, as the reference does."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(f"chip size: expected a positive integer, got {size!r}")
    chip = np.asarray(render(img).resize((size, size), Image.Resampling.BICUBIC))
    # Resizing gray then replicating equals PIL's convert("RGB") then resize (per-channel
    # resampling), at a third of the work.
    return chip if chip.ndim == 3 else np.repeat(chip[:, :, None], 3, axis=2)

