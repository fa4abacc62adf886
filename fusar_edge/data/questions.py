"""Questions and answers about a synthetic scene, as rows of the reference's training manifest.

Each row is what FUSAR-GPT's ``data.TripletDataset`` reads (``image``, ``aef``, ``question``,
``answer``, ``coordinate_size``), plus ``id``, ``task`` (count / locate / classify / detect /
caption, for evaluation), ``group`` (``distractors`` when the scene has ship-like objects on
land, else ``clean``) and ``scene``; the reference ignores keys it does not use.

- **stage 1 (captions)**: what the terrain is, how it is laid out, what lies where (3x3 cells).
- **grid rows (stage 0 only, ours)**: "What lies in each cell of a 3x3 grid?" ->
  "top-left: nothing; top: 2 ships; ...; bottom-right: rock". Nine readouts of "what is at this
  place" per row, for a language model trained from scratch, which needs many thousands of them
  (benchmarks/position_readout_toy.py) where the locate rows give it ~1,300. Measured: within the
  demo's budget they do not yet move it off its prior (benchmarks/results/eval-demo-recipes-vm.md).
  Not a reference task; never in the evaluation manifests.
- **stage 2 (tasks)**: counting ("How many ships ...?" -> "3"), 3x3-grid localisation of a
  single target ("top-left"), classification of the object in a given box ("ship", "aircraft",
  "oil tank", "building", "rock"), and detection with the reference's detection prompt
  (``[{"bbox_2d": [x1, y1, x2, y2], "label": "ship"}]`` in chip pixels, reading order, or ``None``).

Boxes in answers are in the chip frame (``coordinate_size``): the scene's pixel box scaled by
``coordinate_size / scene side``, x2/y2 as the pixel just past the target.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..tasks import DETECT_PROMPT, GRID_CELLS
from .scene import COVER, TARGET_LABELS, Target

PLURAL = {"ship": "ships", "aircraft": "aircraft", "oil tank": "oil tanks"}
COUNT_QUESTIONS = ("How many {p} are there in this image?", "How many {p} are in the image?",
                   "Count the {p} in this image.", "What is the number of {p} in this SAR image?")
LOCATE_QUESTIONS = ("Where is the {l} in this image? Answer with a cell of a 3x3 grid.",
                    "Which part of the image contains the {l}?")
CLASSIFY_QUESTIONS = ("What is the object in the box {box}?", "Classify the target at {box}.")
GRID_QUESTION = "What lies in each cell of a 3x3 grid?"
GRID_ORDER = tuple(c for row in GRID_CELLS for c in row)  # the cells of a grid answer, in reading order
GRID_LABELS = TARGET_LABELS + ("building", "rock")  # the order objects are named within a cell
CAPTION_QUESTIONS = ("Describe this SAR image.", "Describe the scene.", "What does this image show?")


def cell_of(box: list[float], size: int) -> str:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return GRID_CELLS[min(int(cy * 3 / size), 2)][min(int(cx * 3 / size), 2)]


def chip_box(t: Target, scale: float) -> list[int]:
    return [int(round(v * scale)) for v in t.box]


def caption(cover: np.ndarray, targets: list[Target], size: int, scale: float) -> str:
    """Terrain, layout and what lies where, in plain sentences."""
    frac = np.bincount(cover.ravel(), minlength=4) / cover.size
    parts = [f"{COVER[i]} {round(100 * frac[i])}%" for i in np.argsort(-frac) if frac[i] >= 0.02]
    kind = ("open sea" if frac[0] > 0.97 else "coastline" if frac[0] > 0.05 else "inland terrain")
    text = [f"A SAR image of {kind}: {', '.join(parts)}."]
    if 0.05 < frac[0] < 0.95:
        h = cover.shape[0]
        water_cells = {cell_of([x, y, x + 1, y + 1], h) for y in range(h // 6, h, h // 3)
                       for x in range(h // 6, h, h // 3) if cover[y, x] == 0}
        if water_cells:
            text.append(f"Water lies at the {', '.join(sorted(water_cells))}.")
    if frac[3] > 0:
        text.append("A runway crosses the scene.")
    for label in TARGET_LABELS + ("building", "rock"):
        where = [cell_of(chip_box(t, scale), size) for t in targets if t.label == label]
        if where:
            name = PLURAL.get(label, label + "s") if len(where) > 1 else label
            text.append(f"{len(where)} {name} at the {', '.join(where)}.")
    if not any(t.label in TARGET_LABELS for t in targets):
        text.append("No ships, aircraft or oil tanks.")
    return " ".join(text)


def grid_answer(targets: list[Target], size: int, scale: float) -> str:
    """Every cell of the 3x3 grid in reading order with what lies in it (by box centre), or "nothing"."""
    where = [(cell_of(chip_box(t, scale), size), t.label) for t in targets]
    parts = []
    for cell in GRID_ORDER:
        names = []
        for label in GRID_LABELS:
            n = sum(1 for c, lab in where if c == cell and lab == label)
            if n:
                names.append(label if n == 1 else f"{n} {PLURAL.get(label, label + 's')}")
        parts.append(f"{cell}: {', '.join(names) if names else 'nothing'}")
    return "; ".join(parts)


def grid_cells(text: str) -> dict[str, str]:
    """``grid_answer``'s inverse: ``{"top-left": "nothing", "top": "2 ships", ...}`` (lower-cased);
    cells a (model's) text lacks are absent."""
    out = {}
    for part in text.split(";"):
        cell, sep, what = part.partition(":")
        if sep and cell.strip().lower() in GRID_ORDER:
            out[cell.strip().lower()] = what.strip().lower()
    return out


def grid_row(scene_id: str, image: str, aef: str, targets: list[Target], size: int, scale: float,
             group: str) -> dict[str, Any]:
    """The scene's grid row (stage 0 only; see the module's docstring)."""
    return {"id": f"{scene_id}-grid", "image": image, "aef": aef, "coordinate_size": size, "scene": scene_id,
            "group": group, "task": "grid", "question": GRID_QUESTION, "answer": grid_answer(targets, size, scale)}


def scene_rows(rng: np.random.Generator, scene_id: str, image: str, aef: str, cover: np.ndarray,
               targets: list[Target], size: int, group: str) -> tuple[list[dict], list[dict]]:
    """(stage-1 caption rows, stage-2 task rows) for one scene."""
    scale = size / cover.shape[0]
    # Reading order (top to bottom, then left to right), as detection models list boxes: an
    # order the model can learn, where the generator's placement order would be noise.
    targets = sorted(targets, key=lambda t: (t.box[1], t.box[0]))
    base = {"image": image, "aef": aef, "coordinate_size": size, "scene": scene_id, "group": group}
    captions = [{"id": f"{scene_id}-caption", **base, "task": "caption",
                 "question": str(rng.choice(CAPTION_QUESTIONS)), "answer": caption(cover, targets, size, scale)}]
    rows: list[dict[str, Any]] = []
    present = {t.label for t in targets}
    count_labels = ["ship"] + [lab for lab in ("aircraft", "oil tank") if lab in present]
    for label in count_labels:
        n = sum(t.label == label for t in targets)
        q = str(rng.choice(COUNT_QUESTIONS)).format(p=PLURAL[label])
        rows.append({"id": f"{scene_id}-count-{label.replace(' ', '_')}", **base, "task": "count",
                     "question": q, "answer": str(n)})
    for label in TARGET_LABELS:
        of_label = [t for t in targets if t.label == label]
        if len(of_label) == 1:
            q = str(rng.choice(LOCATE_QUESTIONS)).format(l=label)
            rows.append({"id": f"{scene_id}-locate-{label.replace(' ', '_')}", **base, "task": "locate",
                         "question": q, "answer": cell_of(chip_box(of_label[0], scale), size)})
    if targets:
        t = targets[int(rng.integers(0, len(targets)))]
        box = json.dumps(chip_box(t, scale))
        q = str(rng.choice(CLASSIFY_QUESTIONS)).format(box=box)
        rows.append({"id": f"{scene_id}-classify", **base, "task": "classify", "question": q, "answer": t.label})
    ships = [{"bbox_2d": chip_box(t, scale), "label": "ship"} for t in targets if t.label == "ship"]
    rows.append({"id": f"{scene_id}-detect-ship", **base, "task": "detect",
                 "question": DETECT_PROMPT.replace("{label}", "ship"),
                 "answer": json.dumps(ships) if ships else "None"})
    return captions, rows
