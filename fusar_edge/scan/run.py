"""``fusar-edge scan``: whole scenes in, georeferenced detections out, resumable.

Per scene, ``OUT/<scene name>/`` holds:

- ``journal.jsonl`` (``scan.journal``): a header (the scene's identity, the model, the
  settings), then one line per chip as it finishes, flushed to disk; a killed run resumes from
  it (no chip done twice, none lost), and a journal of another scene, model or setting is
  refused, never merged;
- when every chip is done, each written atomically: ``detections.geojson`` (RFC 7946,
  EPSG:4326, whatever the scene's own CRS; pixel space when the scene has no georeference, and
  it says so), ``chips.jsonl`` (every chip's raw answer, in chip order), ``quicklook.png`` and,
  last, ``summary.json``. They are built from the journal alone, sorted, without timings: a
  resumed run writes the same bytes as an uninterrupted one, whoever answered the chips (this
  process, in batches, or Ray workers: ``scan.answerers``, ``scan.ray_pool``).
"""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

from ..errors import FusarError, InputError
from ..fsutil import atomic_writer, write_bytes_atomic, write_text_atomic
from .answerers import ChipQuestion, LocalAnswerer, timed
from .geojson import dumps, feature, feature_collection
from .grid import Chip, chip_grid
from .journal import JOURNAL, Journal
from .merge import Detection, edge_margin, merge_detections
from .quicklook import quicklook_png
from .reader import SceneReader, scene_identity

TASKS = ("detect", "count", "caption")
QUESTIONS = {"detect": "Detect the {label}s in the image.", "count": "How many {label}s are there?",
             "caption": "Describe the scene."}
OUTPUTS = ("detections.geojson", "chips.jsonl", "summary.json", "quicklook.png")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def scan_scene(runner, scene: Path, out: Path, *, task: str = "detect", label: str = "ship", chip: int | None = None,
               overlap: int = 64, no_anchors: bool = False, band: int = 1, max_new_tokens: int | None = None,
               date: str | None = None, progress: Callable[[int, int], None] | None = None) -> dict:
    """Scan one scene; -> the summary (also written to ``summary.json``) plus ``run`` (this run's
    chips, seconds and where they went, which is not written: it differs run to run).

    ``runner``: an open ``Runtime`` (chips answered one by one in this process) or an answerer
    from ``scan.answerers`` / ``scan.ray_pool`` (batched, or on Ray workers)."""
    answerer = runner if hasattr(runner, "answer") else LocalAnswerer(runner)
    if task not in TASKS:
        raise InputError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
    size = int(chip or answerer.chip_size)
    check_grid_settings(size, overlap)
    if task != "caption" and (not isinstance(label, str) or not label.strip()):
        raise InputError(f"--label: expected an object class such as 'ship', got {label!r}")
    folder = out / scene.stem
    t0 = time.perf_counter()
    with SceneReader(scene, band=band) as reader:
        grid = chip_grid(reader.width, reader.height, size, overlap)
        header = {"identity": scene_identity(scene, reader), "weights": answerer.weights, "preset": answerer.preset,
                  "task": task, "label": label, "chip": size, "overlap": overlap, "chips": len(grid),
                  "no_anchors": no_anchors, "band": band,
                  **({"max_new_tokens": max_new_tokens} if max_new_tokens is not None else {}),  # absent: as before
                  **({"date": date} if date is not None else {}),
                  # a resume with another tile store or coverage rule would mix two runs' answers
                  "anchors": None if no_anchors else getattr(answerer, "anchors", None)}
        folder.mkdir(parents=True, exist_ok=True)  # only once the scene and the settings are known good
        # held until the scene is done: a second scan into it would answer every chip twice
        with _lock(folder):
            journal = _disk_guard(lambda: Journal(folder / JOURNAL, header), folder, 0, len(grid))
            done = journal.done()
            finished = len(done)
            todo = len(grid) - finished  # this run's chips
            q = ChipQuestion(task, label, QUESTIONS[task].format(label=label), no_anchors, max_new_tokens, date)
            read_ms: dict[int, float] = {}
            profile: dict[str, float] = {}
            jobs = timed(((c, reader.read(c)) for c in grid if c.index not in done), read_ms)
            try:
                for record in answerer.answer(jobs, q):
                    record.setdefault("timings", {})["read"] = round(read_ms.pop(record["chip"], 0.0), 3)
                    for k, v in record["timings"].items():
                        profile[k] = profile.get(k, 0.0) + v
                    _disk_guard(lambda: journal.append(record), folder, finished, len(grid))
                    finished += 1
                    if progress:
                        progress(finished, len(grid))
            except InputError as exc:  # a chip's error: say which scene (a batch scans several)
                raise InputError(f"scene {scene}: {exc}") from None
            t_write = time.perf_counter()
            summary = _disk_guard(lambda: _write_outputs(folder, reader, grid, journal, header), folder,
                                  finished, len(grid))
            profile["write"] = (time.perf_counter() - t_write) * 1e3
    seconds = time.perf_counter() - t0
    summary["run"] = {"chips": todo, "seconds": round(seconds, 2),
                      "chips_per_s": round(todo / seconds, 3) if seconds > 0 else None,
                      "profile_ms": {k: round(v, 1) for k, v in sorted(profile.items())}}
    return summary


LOCK = ".scan.lock"


def _lock(folder: Path):
    """An exclusive lock on ``folder`` (flock: released by the kernel when the process dies, so a
    killed scan never leaves it held); -> the open file, closed to release it."""
    import fcntl
    import os

    f = open(folder / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise InputError(f"{folder}: another scan (process {holder}) is writing this scene's outputs; wait for it, "
                         "or scan into another --out") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


MIN_CHIP = 28  # one merged ViT token (patch 14 x merge 2): a smaller chip is all upsampling


def check_grid_settings(chip: int | None, overlap: int) -> None:
    """--chip and --overlap on their own (the CLI runs this before loading a model); the overlap's
    bound against the model's own chip comes once the chip is known."""
    if chip is not None and chip < MIN_CHIP:
        raise InputError(f"--chip {chip}: at least {MIN_CHIP} scene pixels (one merged ViT token)")
    if overlap < 0:
        raise InputError(f"--overlap {overlap}: must be at least 0 pixels")
    if chip is not None and overlap > chip // 2:  # beyond it every pixel is read (and answered) > 4 times
        raise InputError(f"--overlap {overlap}: at most half of the chip ({chip // 2} px for --chip {chip})")


def _disk_guard(step, folder: Path, finished: int, total: int):
    """Run ``step``; a full disk stops the scan with one line, the finished chips kept in the journal."""
    try:
        return step()
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        raise FusarError(f"{folder}: disk full ({exc.strerror}) with {finished} of {total} chips done; they are kept "
                         "in the journal: free some space and run the same command again to continue") from None


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


def _anchor_flag(record: dict) -> str | None:
    """"none" for an answered chip the tile store left without anchors (TLM skipped:
    ``--allow-no-coverage``), "partly" for one it covered only in part, else None."""
    anchor = record.get("anchor") or {}
    if record["status"] != "done" or not str(anchor.get("source", "")).startswith("tiles:"):
        return None
    if anchor.get("tlm") == "skipped":
        return "none"
    return "partly" if (anchor.get("coverage") or 0.0) < 1.0 else None


def _write_outputs(folder: Path, reader: SceneReader, grid: Sequence[Chip], journal: Journal, header: dict) -> dict:
    """The scene's outputs from its journal, read chip by chip: memory follows the detections and a
    few numbers per chip, not the records (a 100k-chip scene's journal is hundreds of MB)."""
    task = header["task"]
    where = journal.offsets()
    detections: list[Detection] = []
    counts, anchors, answered = {}, {}, set()
    without, partly = [], []
    degenerate = parse_errors = 0
    with journal.reader() as read, atomic_writer(folder / "chips.jsonl") as chips_log:
        for c in grid:
            r = read(where[c.index])
            # timings vary run to run: kept out
            chips_log.write((json.dumps({k: v for k, v in r.items() if k != "timings"}, sort_keys=True) + "\n")
                            .encode("utf-8"))
            if isinstance(r.get("answer"), list):
                degenerate += sum(1 for b in r["answer"] if isinstance(b, dict) and b.get("degenerate"))
            parse_errors += bool(r.get("parse_error"))
            flag = None if header["no_anchors"] else _anchor_flag(r)  # none asked for: none flagged
            if flag == "none":
                without.append(c.index)
            elif flag == "partly":
                partly.append(c.index)
            if r["status"] != "done":
                continue
            answered.add(c.index)
            if task == "detect":
                found = _chip_detections(r, c, reader)
                if found:
                    a = r.get("anchor") or {}
                    anchors[c.index] = {"anchors": a.get("tlm"), "anchor_coverage": a.get("coverage")}
                detections += found
            elif task == "count" and isinstance(r.get("answer"), int):
                counts[c.index] = r["answer"]
    meta = {"scene": header["identity"]["scene"], "date": reader.date.isoformat() if reader.date else None,
            "georef": reader.georef.describe(), "model": header["preset"], "weights": header["weights"],
            "task": task, "label": header["label"], "chip": header["chip"], "overlap": header["overlap"],
            "coordinates": ("EPSG:4326" if reader.georef.kind != "none"
                            else "none: the scene has no georeference (geometry null; scene_box in pixels)")}
    merged = merge_detections(detections) if task == "detect" else []
    features = [feature(d, reader.georef, {"label": d.label, "chip": d.chip, "chip_box": d.chip_box,
                                           "scene_box": [round(v, 2) for v in d.box], "model": header["preset"],
                                           "weights": header["weights"], "scene": meta["scene"], "date": meta["date"],
                                           **anchors[d.chip]})
                for d in merged]
    summary = {**meta, "chips": len(grid), "chips_answered": len(answered), "chips_nodata": len(grid) - len(answered),
               "chips_without_anchors": without, "chips_partly_covered": partly,
               "detections_before_merge": len(detections), "detections": len(merged),
               "boxes_without_area": degenerate, "parse_errors": parse_errors}
    if task == "count":
        summary["count_per_chip"] = {str(k): v for k, v in sorted(counts.items())}
        summary["count_sum"] = sum(counts.values())
        if header["overlap"]:
            summary["count_note"] = ("the sum of per-chip counts: objects in chip overlaps count twice; --overlap 0, "
                                     "or --task detect for a deduplicated count")
    # summary.json last: its presence says every other output is complete (chips.jsonl is in place)
    write_text_atomic(folder / "detections.geojson", dumps(feature_collection(features, meta)))
    write_bytes_atomic(folder / "quicklook.png", quicklook_png(reader.overview, (reader.width, reader.height), grid,
                                                               answered, merged, counts, set(without)))
    write_text_atomic(folder / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
