"""Dense supervision of the visual tokens from the generator's ground truth (ours, demo stage 0).

A ViT trained from scratch on a few thousand answers learns slowly: a count or a class is one
label per image, and the language model's loss reaches the vision tower through four layers of
attention. The synthetic scenes know where every object is, so each of the 8x8 visual tokens
can be told what lies under it. A small linear head reads each token (after TLM, so the anchors
take part) and is trained to predict:

- for each object label (ship, aircraft, oil tank, building, rock): how many objects of that
  label have their box centre in the token's cell, as a class 0, 1 or "2 or more";
- for a cell holding exactly one object centre: where that centre lies in the cell and the
  box's width and height, in cell units (an L1 loss).

With ``--dense-position`` it also predicts each token's own row and column in the token grid.
The ViT has no absolute position embedding (Qwen2.5-VL's rotary encodings are relative), and
the language model reads a token's place only through M-RoPE, which a small language model
trained from scratch on a few hundred locate and detect rows never learned to do (localisation
at chance, detection F1 0: benchmarks/results/eval-demo-recipes-vm.md). Told to, the ViT can put
where a token lies into the token itself (a window or the image border looks different from
each place), and the language model could then read a box's cell as it reads its content.
Measured: the tokens do learn it (a linear probe reads their row and column at 1.0), but within the
demo's budget the language model does not learn to read it, and counting loses a few points, so
the shipped recipe leaves it off. Given many unique scenes (benchmarks/lm_readout.py on synth16k,
vision frozen) the language model does learn to read it, slowly (locate 0.14 -> 0.52 over 48,000
examples), and without it does not (0.13 -> 0.15): on real tokens this place is what the language
model reads, M-RoPE alone is not enough (benchmarks/results/eval-demo-recipes-vm.md).

Two count terms read the counts off the tokens differently (both off by default; results in
benchmarks/results/eval-demo-recipes-vm.md):

- ``--dense-density``: each token regresses, per label, the share of every object's box that lies
  in its cell (``cell_density``), so the tokens' sum is the count. The centre-cell classes above
  over-count: a ship across a cell border lights up both cells (most false cells of a warmed-up
  head are next to a true one).
- ``--dense-image-count``: every token also classifies the whole image's count of each label
  (0..7+). The ViT's full-attention blocks then gather the count into each token, and the language
  model can read it from any one token as it reads a class, instead of summing 64 tokens.

Measured on the warm-up alone (benchmarks/vision_warmup.py): neither counts better than a warm-up
without it (a 96-wide ViT shares its width among the terms; the density term costs the ship boxes,
and the image-count layer is the worst count reader), so the shipped recipe uses neither.

``--dense-digits W`` is for detection. The language model writes a box as decimal digits
(``[103, 220, 131, 241]``, one token per digit, as Qwen's tokenizer), and a ship's box at IoU 0.5
needs each corner within ~3 px, a ninth of a token's cell. A token whose features only regress the
box (the L1 term above) leaves the language model to turn a position into digits: a function of
the token's place and its regression that it never learned from the detection rows (F1 0, the
coordinate digits flat at 0.47 in ``benchmarks/lm_readout.py``). With this term, the token holding
a single object's centre classifies each digit of each corner of that object's box as the answer
writes it (hundreds, tens, units of ``round(x1)``, ``round(y1)``, ``round(x2)``, ``round(y2)``): 12
ten-way classes, so the language model only has to copy a digit it can read off one token.
Measured (benchmarks/results/eval-demo-recipes-vm.md): at weight 1 the language model's coordinate
digits leave the shipped tokens' plateau (0.47 -> 0.58 over 44,800 detection examples, still rising),
but the head counts 14 points worse: off by default. ``--dense-digit-labels ship`` keeps the term to
the ship cells (detection's one label); it costs the counts no less (0.745 -> 0.553), so the width the
term takes is not the other labels' boxes.

The head exists only while training: it is not part of the saved model, and the runtime never
sees it. Real FUSAR-GPT training has no such labels and no such stage; a real Qwen2.5-VL vision
tower was pretrained by its authors on far more data. This is how the 2-core demo gets a vision
tower that sees 5-20 px targets at all.

Used two ways by ``train --stage 0 --dense-truth scenes.jsonl``: a warm-up of the vision tower
(and TLM) on this loss alone (``--dense-warmup-epochs``, batches of whole images: cheap, no
language model), then as an extra term beside the answer loss (``--dense-weight``).

``--dense-augment`` draws, for every image of every warm-up batch, one of the four flips
(none, left-right, up-down, both) and applies it to the chip, its anchors' positions and its
ground truth alike: a vision tower warmed on 1,600 scenes fits them far better than unseen ones
(benchmarks/results/eval-demo-recipes-vm.md), and a flipped SAR scene is still a SAR scene (the
azimuth smear keeps its axis). The main loop's answers (grid cells, boxes) are never flipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.scene import DISTRACTOR_LABELS, TARGET_LABELS
from ..errors import DivergedError, InputError
from .loop import _lr_factor

LABELS = TARGET_LABELS + DISTRACTOR_LABELS
BOX_DIGITS = 12  # --dense-digits: hundreds, tens and units of each of a box's four corners (x1, y1, x2, y2)
IGNORE = -100  # F.cross_entropy's ignore_index: a cell without exactly one object centre has no box digits
COUNT_CLASSES = 3  # 0, 1, 2-or-more object centres of a label in one cell
IMAGE_COUNT_CLASSES = 8  # 0..6, 7-or-more objects of a label in the whole image (--dense-image-count)


def load_truth(path: str | Path) -> dict[str, list[dict]]:
    """``scenes.jsonl`` of ``fusar-edge data synth`` -> {scene id: targets}."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"--dense-truth {path}: cannot be read ({exc.strerror})") from None
    truth = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            scene = json.loads(line)
            truth[str(scene["id"])] = list(scene["targets"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"--dense-truth {path}: line {i + 1}: expected a scenes.jsonl row of `fusar-edge data "
                             "synth` (with id and targets)") from None
    return truth


def _centre_cells(targets: list[dict], chip: int, token_grid: tuple[int, int]):
    """``(label, (x1, y1, x2, y2) floats, raster index of the cell holding the box centre)`` for each
    target of a label the head knows (others are skipped)."""
    gh, gw = token_grid
    cell_h, cell_w = chip / gh, chip / gw
    for t in targets:
        if t["label"] not in LABELS:
            continue
        x1, y1, x2, y2 = (float(v) for v in t["box"])
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        yield t["label"], (x1, y1, x2, y2), min(int(cy / cell_h), gh - 1) * gw + min(int(cx / cell_w), gw - 1)


def cell_labels(targets: list[dict], chip: int, token_grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    """-> ``(counts [T, L] long in 0..2, boxes [T, 4] float, has_box [T] bool)`` in raster order."""
    gh, gw = token_grid
    cell_h, cell_w = chip / gh, chip / gw
    counts = torch.zeros(gh * gw, len(LABELS), dtype=torch.long)
    boxes = torch.zeros(gh * gw, 4)
    centres = torch.zeros(gh * gw, dtype=torch.long)
    for label, (x1, y1, x2, y2), cell in _centre_cells(targets, chip, token_grid):
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        gy, gx = divmod(cell, gw)
        counts[cell, LABELS.index(label)] += 1
        centres[cell] += 1
        boxes[cell] = torch.tensor([cx / cell_w - gx, cy / cell_h - gy, (x2 - x1) / cell_w, (y2 - y1) / cell_h])
    return counts.clamp_(max=COUNT_CLASSES - 1), boxes, centres == 1


def cell_density(targets: list[dict], chip: int, token_grid: tuple[int, int]) -> torch.Tensor:
    """-> ``[T, L]`` float, raster order: for each label, the share of each object's box (clipped to
    the chip) that lies in each token's cell, summed over the objects. Every object adds exactly 1
    over the grid, so a label's column sums to its count; a ship across a cell border is split
    between the cells rather than given to the one holding its centre."""
    gh, gw = token_grid
    cell_h, cell_w = chip / gh, chip / gw
    density = torch.zeros(gh * gw, len(LABELS))
    for t in targets:
        if t["label"] not in LABELS:
            continue
        x1, y1, x2, y2 = (float(v) for v in t["box"])
        x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(chip)), min(y2, float(chip))
        if x2 <= x1 or y2 <= y1:
            continue
        # overlap of the box with every cell: the product of its row and column overlaps
        rows = (torch.minimum(torch.arange(1, gh + 1) * cell_h, torch.tensor(y2))
                - torch.maximum(torch.arange(gh) * cell_h, torch.tensor(y1))).clamp(min=0)
        cols = (torch.minimum(torch.arange(1, gw + 1) * cell_w, torch.tensor(x2))
                - torch.maximum(torch.arange(gw) * cell_w, torch.tensor(x1))).clamp(min=0)
        density[:, LABELS.index(t["label"])] += (rows[:, None] * cols[None, :]).reshape(-1) / ((x2 - x1) * (y2 - y1))
    return density


def cell_digits(targets: list[dict], chip: int, token_grid: tuple[int, int],
                labels: tuple[str, ...] = ()) -> torch.Tensor:
    """-> ``[T, 12]`` long, raster order: for a cell holding exactly one object centre (``cell_labels``'
    ``has_box``), the hundreds, tens and units digits of that object's ``x1, y1, x2, y2``, each rounded
    and clipped to ``[0, chip]`` as a detection answer writes it in the chip frame; ``IGNORE`` elsewhere.
    ``labels``, when given, keeps only the cells whose one object has one of those labels (the others
    still count as centres: a ship beside an oil tank in one cell has no digits)."""
    gh, gw = token_grid
    digits = torch.full((gh * gw, BOX_DIGITS), IGNORE, dtype=torch.long)
    centres = torch.zeros(gh * gw, dtype=torch.long)
    for label, box, cell in _centre_cells(targets, chip, token_grid):
        centres[cell] += 1
        if labels and label not in labels:
            continue
        corners = [min(max(int(round(v)), 0), chip) for v in box]
        digits[cell] = torch.tensor([d for v in corners for d in (v // 100 % 10, v // 10 % 10, v % 10)])
    digits[centres != 1] = IGNORE
    return digits


def cell_boxes(occupied: torch.Tensor, box_out: torch.Tensor, chip: int, token_grid: tuple[int, int]) -> list[list[float]]:
    """The inverse of ``cell_labels``' box encoding: one ``[x1, y1, x2, y2]`` (chip pixels) per cell
    where ``occupied [T]`` is true, from that cell's (centre in the cell, width, height) in cell units
    ``box_out [T, 4]``. Cells in raster order."""
    gh, gw = token_grid
    cell_h, cell_w = chip / gh, chip / gw
    boxes = []
    for cell in torch.nonzero(occupied).flatten().tolist():
        gy, gx = divmod(cell, gw)
        ox, oy, w, h = (float(v) for v in box_out[cell])
        cx, cy = (gx + ox) * cell_w, (gy + oy) * cell_h
        boxes.append([cx - w * cell_w / 2, cy - h * cell_h / 2, cx + w * cell_w / 2, cy + h * cell_h / 2])
    return boxes


class DenseHead(nn.Module):
    """Per-token logits for the per-label counts and the one-object box (training only)."""

    def __init__(self, channels: int, pos_weight: float = 1.0, position_grid: tuple[int, int] | None = None,
                 density_weight: float = 0.0, image_count_weight: float = 0.0, digits_weight: float = 0.0):
        super().__init__()
        self.proj = nn.Linear(channels, len(LABELS) * COUNT_CLASSES + 4)
        # weight of a cell-label pair that holds an object (count class 1 or 2+) in the count term;
        # 1: plain cross-entropy. Empty pairs are ~97 % of them, so the head learns "0" first.
        self.pos_weight = float(pos_weight)
        # --dense-position: the token grid (rows, columns) whose row and column each token predicts
        self.position_grid = tuple(position_grid) if position_grid else None
        self.position = nn.Linear(channels, sum(self.position_grid)) if self.position_grid else None
        # --dense-density: weight of the per-token density term (0: off); see density_loss
        self.density_weight = float(density_weight)
        self.density = nn.Linear(channels, len(LABELS)) if self.density_weight > 0 else None
        # --dense-image-count: weight of the whole-image count term (0: off); see image_count_loss
        self.image_count_weight = float(image_count_weight)
        self.image_count = (nn.Linear(channels, len(LABELS) * IMAGE_COUNT_CLASSES) if self.image_count_weight > 0
                            else None)
        # --dense-digits: weight of the box-digit term (0: off); see digits_loss
        self.digits_weight = float(digits_weight)
        self.digits = nn.Linear(channels, BOX_DIGITS * 10) if self.digits_weight > 0 else None

    def loss(self, visual: torch.Tensor, labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``labels``: ``cell_labels``' three tensors, then ``cell_density``'s (needed by the density and
        image-count terms) and ``cell_digits``' (the digit term), as ``DenseTargets`` gives them."""
        counts, boxes, has_box = (x.to(visual.device) for x in labels[:3])
        out = self.proj(visual.float())
        count_logits = out[:, :len(LABELS) * COUNT_CLASSES].reshape(-1, COUNT_CLASSES)
        if self.pos_weight == 1.0:
            loss = F.cross_entropy(count_logits, counts.reshape(-1))
        else:  # a mean over every pair as above, the occupied ones counted pos_weight times
            per = F.cross_entropy(count_logits, counts.reshape(-1), reduction="none")
            loss = (per * torch.where(counts.reshape(-1) > 0, self.pos_weight, 1.0)).mean()
        if bool(has_box.any()):
            loss = loss + F.smooth_l1_loss(out[has_box, -4:], boxes[has_box], beta=0.1)
        if self.position is not None:
            loss = loss + self.position_loss(visual)
        if self.density is not None:
            loss = loss + self.density_weight * self.density_loss(visual, labels[3].to(visual.device))
        if self.image_count is not None:
            loss = loss + self.image_count_weight * self.image_count_loss(visual, labels[3].to(visual.device))
        if self.digits is not None and bool((labels[4] != IGNORE).any()):  # an image with no such cell adds nothing
            loss = loss + self.digits_weight * self.digits_loss(visual, labels[4].to(visual.device))
        return loss

    def digits_loss(self, visual: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the 12 box digits (``cell_digits``) of each cell holding one object centre,
        averaged over those cells and digits."""
        logits = self.digits(visual.float()).reshape(-1, 10)
        return F.cross_entropy(logits, digits.reshape(-1), ignore_index=IGNORE)

    def read_digits(self, visual: torch.Tensor) -> torch.Tensor:
        """``[T, 4]`` long: each token's reading of its object's ``x1, y1, x2, y2`` from the digit classes."""
        d = self.digits(visual.float()).reshape(visual.shape[0], 4, 3, 10).argmax(-1)
        return d[..., 0] * 100 + d[..., 1] * 10 + d[..., 2]

    def image_count_loss(self, visual: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every token's guess at the whole image's count of each label (a class
        0..7+; the counts are ``density``'s column sums, each object adding exactly 1). The ViT's
        full-attention blocks must then gather the count into each token, so the language model
        reads it from any one token instead of summing 64 of them."""
        want = density.sum(0).round().long().clamp(max=IMAGE_COUNT_CLASSES - 1)  # [L]
        logits = self.image_count(visual.float()).reshape(-1, IMAGE_COUNT_CLASSES)  # [T * L, C]
        return F.cross_entropy(logits, want.repeat(visual.shape[0]))

    def read_image_counts(self, visual: torch.Tensor) -> torch.Tensor:
        """``[L]`` long: the image-count head's reading (its logits averaged over the tokens)."""
        logits = self.image_count(visual.float()).reshape(visual.shape[0], len(LABELS), IMAGE_COUNT_CLASSES)
        return logits.mean(0).argmax(-1)

    def density_loss(self, visual: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
        """Squared error of each token's per-label density (``cell_density``), summed over the
        tokens, plus that of the image's count (the tokens' sum), both averaged over the labels."""
        pred = self.density(visual.float())
        return ((pred - density) ** 2).sum(0).mean() + ((pred.sum(0) - density.sum(0)) ** 2).mean()

    def position_loss(self, visual: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of each token's row plus that of its column (tokens in raster order)."""
        gh, gw = self.position_grid
        if visual.shape[0] != gh * gw:
            raise ValueError(f"dense head: {visual.shape[0]} visual tokens, expected the {gh}x{gw} grid")
        idx = torch.arange(gh * gw, device=visual.device)
        out = self.position(visual.float())
        return F.cross_entropy(out[:, :gh], idx // gw) + F.cross_entropy(out[:, gh:], idx % gw)


class DenseTargets:
    """Row -> ``(*cell_labels, cell_density, cell_digits)`` of its scene (cached), for one chip size and
    token grid."""

    def __init__(self, truth: dict[str, list[dict]], chip: int, token_grid: tuple[int, int],
                 digit_labels: tuple[str, ...] = ()):
        self.truth, self.chip, self.grid, self.digit_labels = truth, chip, token_grid, tuple(digit_labels)
        self._cache: dict[str, tuple] = {}

    def __call__(self, row: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sid = str(row.get("scene", ""))
        if sid not in self.truth:
            raise InputError(f"row {row.get('id', '?')}: scene {sid!r} is not in --dense-truth (use the scenes.jsonl "
                             "of the dataset the manifests came from)")
        if sid not in self._cache:
            targets = self.truth[sid]
            self._cache[sid] = (*cell_labels(targets, self.chip, self.grid),
                                cell_density(targets, self.chip, self.grid),
                                cell_digits(targets, self.chip, self.grid, self.digit_labels))
        return self._cache[sid]


def flip_image(chip, anchors, targets: list[dict], flip: int, config, digit_labels: tuple[str, ...] = ()) -> tuple:
    """One image flipped: ``flip`` bit 0 left-right, bit 1 up-down (0: as it is).

    ``chip`` uint8 ``[H, W, 3]``; ``anchors`` ``(features, positions (y, x) in [0, 1], mask)`` or
    None; ``targets`` the scene's ground truth (boxes ``[x1, y1, x2, y2]``, x2/y2 exclusive, chip
    pixels). -> ``(pixels, grid_thw, anchors, cell labels)``, what ``warmup`` takes per image.
    """
    import numpy as np

    from ..model.preprocess import chip_to_patches

    fx, fy = bool(flip & 1), bool(flip & 2)
    h, w = chip.shape[:2]
    if fx:
        chip = chip[:, ::-1]
    if fy:
        chip = chip[::-1]
    vis = config.vision
    pixels, grid = chip_to_patches(np.ascontiguousarray(chip), int(vis.get("patch_size", 14)),
                                   int(vis.get("spatial_merge_size", 2)), int(vis.get("temporal_patch_size", 2)))
    if anchors is not None and (fx or fy):
        features, positions, mask = anchors
        positions = torch.as_tensor(positions).clone()
        if fy:
            positions[:, 0] = 1 - positions[:, 0]
        if fx:
            positions[:, 1] = 1 - positions[:, 1]
        anchors = (features, positions, mask)
    flipped = []
    for t in targets:
        x1, y1, x2, y2 = t["box"]
        if fx:
            x1, x2 = w - x2, w - x1
        if fy:
            y1, y2 = h - y2, h - y1
        flipped.append({**t, "box": [x1, y1, x2, y2]})
    return (torch.from_numpy(pixels), torch.from_numpy(grid), anchors,
            (*cell_labels(flipped, config.chip_size, config.token_grid),
             cell_density(flipped, config.chip_size, config.token_grid),
             cell_digits(flipped, config.chip_size, config.token_grid, digit_labels)))


def warmup(model, head: DenseHead, images: list[tuple], epochs: float, lr: float, batch: int = 16, seed: int = 0,
           show_progress: bool = True, augment: Callable[[int, int], tuple] | None = None) -> list[float]:
    """Train the vision tower, TLM and ``head`` on the dense loss alone; returns per-step losses.

    ``images``: ``(pixels, grid_thw, anchors or None, cell labels)`` per image. AdamW with a 5 %
    linear warm-up and linear decay (the main loop's schedule). ``augment(i, flip)``, when given,
    returns image ``i`` flipped (``flip_image``); each chosen image gets a random flip in 0..3
    (drawn from its own generator: the image order is the same with and without it).
    """

    params = [p for p in model.visual.parameters()] + list(head.parameters())
    if model.tlm is not None:
        params += list(model.tlm.parameters())
    steps_per_epoch = -(-len(images) // batch)
    total = max(1, int(round(epochs * steps_per_epoch)))
    warm = max(1, total // 20)
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: _lr_factor(s, total, warm))
    bar = None
    if show_progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=total, desc="vision warm-up", unit="step", file=sys.stderr, dynamic_ncols=True)
    model.train()
    losses: list[float] = []
    order: list[int] = []
    gen = torch.Generator().manual_seed(seed)
    flips = torch.Generator().manual_seed(seed + 1)
    try:
        for step in range(total):
            if len(order) < batch:
                order += torch.randperm(len(images), generator=gen).tolist()
            if augment is None:
                chosen = [images[i] for i in order[:batch]]
            else:
                chosen = [augment(i, int(f)) for i, f in zip(order[:batch], torch.randint(0, 4, (batch,), generator=flips))]
            del order[:batch]
            tokens = model.vision_many([c[:3] for c in chosen])
            loss = torch.stack([head.loss(t, c[3]) for t, c in zip(tokens, chosen)]).mean()
            if not torch.isfinite(loss):
                raise DivergedError(f"vision warm-up: the dense loss is {float(loss)} at step {step + 1} of {total}; "
                                    "try a lower --dense-warmup-lr")
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            sched.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    return losses


@dataclass
class DenseSettings:
    truth: Path  # scenes.jsonl of the dataset
    weight: float = 1.0  # of the dense term beside the answer loss (0: warm-up only)
    warmup_epochs: float = 0.0  # passes over the images on the dense loss alone, before the main loop
    warmup_lr: float = 2e-3
    batch: int = 16  # images per warm-up step
    augment: bool = False  # random flips of each warm-up image (with its anchors and truth)
    pos_weight: float = 1.0  # weight of the cells holding an object in the count term (1: plain)
    position: bool = False  # also predict each token's row and column (where it lies)
    density: float = 0.0  # weight of the per-token density term (each token's share of each object; 0: off)
    image_count: float = 0.0  # weight of the whole-image count term (every token guesses the counts; 0: off)
    digits: float = 0.0  # weight of the box-digit term (the one-object cells' box digits; 0: off)
    digit_labels: tuple[str, ...] = ()  # the digit term's labels (empty: all; detection asks for ships)

    def check(self) -> None:
        if not self.weight >= 0:
            raise InputError(f"--dense-weight: expected a number >= 0, got {self.weight}")
        if not self.warmup_epochs >= 0:
            raise InputError(f"--dense-warmup-epochs: expected a number >= 0, got {self.warmup_epochs}")
        if not self.warmup_lr > 0:
            raise InputError(f"--dense-warmup-lr: expected a positive number, got {self.warmup_lr}")
        if not self.image_count >= 0:
            raise InputError(f"--dense-image-count: expected a number >= 0, got {self.image_count}")
        if not self.digits >= 0:
            raise InputError(f"--dense-digits: expected a number >= 0, got {self.digits}")
        unknown = [label for label in self.digit_labels if label not in LABELS]
        if unknown:
            raise InputError(f"--dense-digit-labels: unknown label {unknown[0]!r}; expected some of {', '.join(LABELS)}")
        if not self.density >= 0:
            raise InputError(f"--dense-density: expected a number >= 0, got {self.density}")
        if not self.pos_weight > 0:
            raise InputError(f"--dense-pos-weight: expected a positive number, got {self.pos_weight}")
