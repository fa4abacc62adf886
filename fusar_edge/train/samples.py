"""Manifest rows -> training samples, as the reference's ``data.TripletCollator`` builds them.

A row (``image``, ``aef``, ``question``, ``answer``, ``coordinate_size``; paths relative to
the manifest) becomes: the chip's ViT patches, the anchor set, and the token ids of the chat
sequence ``system + user(<image>, question) + assistant`` followed by the answer's ids and the
end-of-turn id (the reference's ``tok.eos_token_id``, ``<|im_end|>``). Labels are -100 on the
prompt and the answer ids + end-of-turn after it: the loss is on the answer and the stop only.
A non-string answer is JSON-encoded, as the reference does. A sequence longer than
``max_length`` is an error, never truncated (cutting a box list would teach wrong boxes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..geo.anchors import AnchorSet
from ..geo.chip import to_chip
from ..geo.sar import read_sar
from ..lru import BoundedCache
from ..model.preprocess import chip_to_patches
from ..model.rope import mrope_positions
from ..tasks import reference_question
from ..tokenizer import build_sequence
from ..data.task_rows import read_manifest  # noqa: F401  (callers import it here)


@dataclass
class Sample:
    pixels: torch.Tensor  # [patches, patch_dim]
    grid_thw: torch.Tensor  # [1, 3]
    anchors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    input_ids: torch.Tensor  # [L]
    labels: torch.Tensor  # [L], -100 where no loss
    positions: torch.Tensor  # [3, 1, L]
    layout: Any
    question_ids: torch.Tensor


# Images (and anchor sets) kept decoded. A 224-px chip's patches are ~1.2 MB of float32, so a
# dataset of 12,800 scenes would need 15 GB to keep them all; a miss costs one PNG read (~ms).
# Rows of one image come together in the manifests, so the few most recent serve them.
CACHED_IMAGES = 256


class SampleBuilder:
    """Builds samples for one model config and tokenizer; keeps the most recent images' patches and
    anchors (``CACHED_IMAGES``), so memory stays bounded whatever the dataset's size."""

    def __init__(self, config, tokenizer, max_length: int = 2048, use_anchors: bool = True,
                 cached_images: int = CACHED_IMAGES):
        self.config, self.tok = config, tokenizer
        self.max_length, self.use_anchors = max_length, use_anchors
        self._images = BoundedCache(cached_images)
        self._anchors = BoundedCache(cached_images)
        self._checked: set[str] = set()  # image and anchor files ``check`` has read (a path each)

    def _image(self, path: Path):
        def load():
            cfg = self.config
            chip = to_chip(read_sar(path), cfg.chip_size)
            pixels, grid = chip_to_patches(chip, int(cfg.vision.get("patch_size", 14)),
                                           int(cfg.vision.get("spatial_merge_size", 2)),
                                           int(cfg.vision.get("temporal_patch_size", 2)))
            return torch.from_numpy(pixels), torch.from_numpy(grid)

        return self._images.lookup(str(path), load)

    def _anchor(self, path: Path):
        return self._anchors.lookup(str(path), lambda: AnchorSet.load(path).to_torch())

    def image_inputs(self, row: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
        """``(pixels, grid_thw, anchors or None)`` of a row's image (the recent ones cached)."""
        pixels, grid = self._image(Path(row["_root"]) / row["image"])
        return pixels, grid, self.anchors(row)

    def anchors(self, row: dict[str, Any]) -> tuple | None:
        """A row's anchor set (the recent ones cached), or None when training without anchors."""
        return self._anchor(Path(row["_root"]) / row["aef"]) if self.use_anchors else None

    def __call__(self, row: dict[str, Any], with_answer: bool = True) -> Sample:
        cfg = self.config
        self._check_size(row)
        pixels, grid, anchors = self.image_inputs(row)
        ids, labels, seq = self._sequence(row, with_answer)
        positions, _ = mrope_positions(len(ids), seq.layout.image_start, cfg.token_grid)
        return Sample(pixels, grid, anchors, ids, labels, torch.from_numpy(positions), seq.layout,
                      torch.from_numpy(seq.question_ids))

    def check(self, row: dict[str, Any]) -> None:
        """Raise the ``InputError`` that building ``row``'s sample would raise (its size, its image and
        anchor files, its length), without building it: each image and anchor file is read once per
        builder however many rows share it, and no ViT patches are made. What ``train`` runs over every
        row before the first step: 3.3x faster than building every sample on synth16k's stage-0 rows
        (whose few cached images are evicted between an image's rows in two manifests, so each image
        was decoded twice, and its patches made each time)."""
        self._check_size(row)
        image = Path(row["_root"]) / row["image"]
        if str(image) not in self._checked:
            to_chip(read_sar(image), self.config.chip_size)
            self._checked.add(str(image))
        if self.use_anchors:
            aef = Path(row["_root"]) / row["aef"]
            if str(aef) not in self._checked:
                AnchorSet.load(aef)
                self._checked.add(str(aef))
        self._sequence(row, with_answer=True)

    def _check_size(self, row: dict[str, Any]) -> None:
        size = row.get("coordinate_size", self.config.chip_size)
        if size != self.config.chip_size:
            raise InputError(f"row {row.get('id', '?')}: coordinate_size {size} != the model's chip {self.config.chip_size} "
                             "(convert the annotations explicitly)")

    def _sequence(self, row: dict[str, Any], with_answer: bool) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """-> ``(input_ids, labels, built sequence)``: the chat sequence, the answer and end-of-turn after
        it when ``with_answer``; an over-long one is an error."""
        cfg = self.config
        question = reference_question(row["question"])
        grasp_len = cfg.grasp.prompt_len if cfg.grasp.enabled else 0  # the slots the runtime leaves for it
        seq = build_sequence(self.tok, question, cfg.num_visual_tokens, grasp_len, cfg.system_prompt)
        prompt = torch.from_numpy(seq.input_ids)
        if with_answer:
            answer = row["answer"] if isinstance(row["answer"], str) else json.dumps(row["answer"], ensure_ascii=False)
            response = torch.tensor(self.tok.encode(answer) + [self.tok.ids["<|im_end|>"]], dtype=torch.long)
            ids = torch.cat([prompt, response])
            labels = torch.cat([torch.full_like(prompt, -100), response])
        else:
            ids, labels = prompt, torch.full_like(prompt, -100)
        if len(ids) > self.max_length:
            raise InputError(f"row {row.get('id', '?')}: {len(ids)} tokens exceed max_length {self.max_length}; "
                             "raise --max-length rather than truncate the answer")
        return ids, labels, seq
