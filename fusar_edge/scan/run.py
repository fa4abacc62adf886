"""``fusar-edge scan``: whole scenes in, georeferenced detections out, resumable.

Per scene, ``OUT/<scene name>/`` holds:

- ``journal.jsonl``: a header (the scene's identity, the model, the settings), then one line per
  chip as it finishes, flushed to disk; a killed run resumes from it (no chip done twice, none
  lost), and a journal of another scene, model or setting is refused, never merged;
- when every chip is done, written atomically: ``detections.geojson`` (RFC 7946, EPSG:4326; pixel
  space when the scene has no georeference, and it says so), ``chips.jsonl`` (every chip's raw
  answer, in chip order) and ``summary.json``. These are built from the journal alone, sorted,
  without timings: a resumed run writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

from ..errors import InputError
from ..fsutil import write_text_atomic
from .geojson import dumps, feature, feature_collection
from .grid import Chip, chip_grid
from .merge import Detection, edge_margin, merge_detections
from .reader import SceneReader, scene_identity

TASKS = ("detect", "count", "caption")
JOURNAL = "journal.jsonl"
QUESTIONS = {"detect": "Detect the {label}s in the image.", "count": "How many {label}s are there?",
             "caption": "Describe the scene."}


def scan_scene(rt, scene: Path, out: Path, *, task: str = "detect", label: str = "ship", chip: int | None = None,
               overlap: int = 64, no_anchors: bool = False, progress: Callable[[int, int], None] | None = None) -> dict:
    """Scan one scene with an open ``Runtime``; -> the summary (also written to ``summary.json``)."""
    if task not in TASKS:
        raise InputError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    size = int(chip or rt.config.chip_size)
    if overlap > size // 2:  # beyond it every pixel is read (and answered) more than 4 times; the grid would grow
        raise InputError(f"--overlap {overlap}: at most half of the chip ({size // 2} px for --chip {size})")
    folder = out / scene.stem
    with SceneReader(scene) as reader:
        grid = chip_grid(reader.width, reader.height, size, overlap)
        header = {"identity": scene_identity(scene, reader), "weights": rt.weights, "preset": rt.config.name,
                  "task": task, "label": label, "chip": size, "overlap": overlap, "chips": len(grid),
                  "no_anchors": no_anchors}
        folder.mkdir(parents=True, exist_ok=True)  # only once the scene and the settings are known good
        journal = Journal(folder / JOURNAL, header)
        done = journal.done()
        question = QUESTIONS[task].format(label=label)
        todo = [c for c in grid if c.index not in done]
        finished = len(grid) - len(todo)
        t0 = time.perf_counter()
        for c in todo:
            journal.append(_answer_chip(rt, reader, c, task, label, question, no_anchors))
            finished += 1
            if progress:
                progress(finished, len(grid))
        records = journal.records()
        summary = _write_outputs(folder, reader, grid, records, header, rt)
    summary["seconds_this_run"] = round(time.perf_counter() - t0, 2)
    return summary


def _answer_chip(rt, reader: SceneReader, c: Chip, task: str, label: str, question: str, no_anchors: bool) -> dict:
    record = {"chip": c.index, "window": [c.x0, c.y0, c.width, c.height]}
    img = reader.read(c)
    if img is None:
        return {**record, "status": "nodata"}
    ans = rt.ask(img, question, task=task, label=label if task == "detect" else None, no_anchors=no_anchors)
    record.update(status="done", text=ans.text, answer=ans.answer, parse_error=ans.parse_error,
                  anchor={k: ans.anchor.get(k) for k in ("source", "coverage", "tlm")},
                  ms=round(ans.timings_ms["total"], 1))
    return record


def _chip_detections(record: dict, c: Chip, reader: SceneReader) -> list[Detection]:
    out = []
    for box in record.get("answer") or []:
        # a box of no area (the parser flags it, never drops it) has no polygon: counted in the summary
        if not isinstance(box, dict) or "bbox_2d" not in box or box.get("degenerate"):
            continue
        x0, y0, x1, y1 = box["bbox_2d"]
        scene_box = (c.x0 + x0, c.y0 + y0, c.x0 + x1, c.y0 + y1)
        out.append(Detection(scene_box, str(box.get("label") or ""), c.index, box.get("bbox_chip"),
                             edge_margin(scene_box, c, reader.width, reader.height)))
    return out


def _write_outputs(folder: Path, reader: SceneReader, grid: list[Chip], records: dict[int, dict], header: dict,
                   rt) -> dict:
    task = header["task"]
    chips_log = []
    detections: list[Detection] = []
    counts = {}
    for c in grid:
        r = records[c.index]
        chips_log.append({k: v for k, v in r.items() if k != "ms"})  # timings vary run to run: kept out
        if r["status"] != "done":
            continue
        if task == "detect":
            detections += _chip_detections(r, c, reader)
        elif task == "count" and isinstance(r.get("answer"), int):
            counts[c.index] = r["answer"]
    meta = {"scene": header["identity"]["scene"], "date": reader.date.isoformat() if reader.date else None,
            "georef": reader.georef.describe(), "model": header["preset"], "weights": header["weights"],
            "task": task, "label": header["label"], "chip": header["chip"], "overlap": header["overlap"],
            "coordinates": "EPSG:4326" if reader.georef.kind != "none" else "scene pixels (no georeference)"}
    merged = merge_detections(detections) if task == "detect" else []
    features = [feature(d, reader.georef, {"label": d.label, "chip": d.chip, "chip_box": d.chip_box,
                                           "scene_box": [round(v, 2) for v in d.box], "model": header["preset"],
                                           "weights": header["weights"], "scene": meta["scene"], "date": meta["date"]})
                for d in merged]
    write_text_atomic(folder / "chips.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in chips_log))
    write_text_atomic(folder / "detections.geojson", dumps(feature_collection(features, meta)))
    n_done = sum(1 for r in records.values() if r["status"] == "done")
    summary = {**meta, "chips": len(grid), "chips_answered": n_done, "chips_nodata": len(grid) - n_done,
               "detections_before_merge": len(detections), "detections": len(merged),
               "boxes_without_area": sum(1 for r in records.values() if isinstance(r.get("answer"), list)
                                         for b in r["answer"] if isinstance(b, dict) and b.get("degenerate")),
               "parse_errors": sum(1 for r in records.values() if r.get("parse_error"))}
    if task == "count":
        summary["count_per_chip"] = {str(k): v for k, v in sorted(counts.items())}
        summary["count_sum"] = sum(counts.values())
        if header["overlap"]:
            summary["count_note"] = ("the sum of per-chip counts: objects in chip overlaps count twice; --overlap 0, "
                                     "or --task detect for a deduplicated count")
    write_text_atomic(folder / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


class Journal:
    """Append-only record of finished chips; refuses a folder that belongs to another run."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header = path, header
        if path.exists():
            self._check_header()
        else:
            write_text_atomic(path, json.dumps({"header": header}, sort_keys=True) + "\n")

    def _lines(self) -> list[str]:
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):  # a line cut by a kill: drop it, the chip runs again
            raw = raw[: raw.rfind(b"\n") + 1]
            with open(self.path, "r+b") as f:
                f.truncate(len(raw))
        return raw.decode("utf-8").splitlines()

    def _check_header(self) -> None:
        lines = self._lines()
        try:
            found = json.loads(lines[0])["header"] if lines else None
        except (json.JSONDecodeError, KeyError, TypeError):
            found = None
        if found is None:
            raise InputError(f"{self.path}: not a scan journal; choose another --out")
        for key in self.header:
            if found.get(key) != self.header[key]:
                raise InputError(f"{self.path.parent}: holds a scan of another {_what(key)} ({key} differs); it is "
                                 "not merged: choose another --out, or delete the folder to start over")

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> dict[int, dict]:
        out = {}
        for line in self._lines()[1:]:
            r = json.loads(line)
            out[int(r["chip"])] = r
        return out

    def done(self) -> set[int]:
        return set(self.records())


def _what(key: str) -> str:
    return {"identity": "scene (or the scene file changed)", "weights": "model", "preset": "model"}.get(key, "setting")

