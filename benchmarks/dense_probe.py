"""How well do stage 0's warmed-up visual tokens alone count? A linear-probe reading of the dense head.

    python benchmarks/dense_probe.py --run runs/demo/s0 --data data/synth2k
    python benchmarks/dense_probe.py --run runs/demo-noaef/s0 --data data/synth2k --no-aef
    python benchmarks/dense_probe.py --run runs/demo/s0 --data data/synth2k --split val --after-stage0

Loads the vision tower, TLM and training-only dense head saved by ``train --stage 0
--dense-warmup-epochs`` (``OUT/dense-warmup.pt``; with ``--after-stage0`` the same modules at the
end of stage 0's main loop, from ``OUT/checkpoint/state.pt``), runs every scene of the split, and
counts each label as the sum over the 64 tokens of the head's per-cell class (0, 1, 2-or-more:
a cell with three centres counts two, so this slightly under-counts crowded scenes). Prints the
exact-count rate per label and scene group, and the same reading scored on the split's stage-2
count rows (exact, MAE: comparable with ``fusar-edge eval``'s counting metrics): what the language
model could read at best from a linear view of the tokens. ``ceiling`` is the same reading of the
true cell classes (what the 2-or-more clamp alone loses). It also decodes one ship box per cell the
head says holds a ship (the head's centre and size) and scores them on the split's detection rows
as ``fusar-edge eval`` does (precision / recall / F1 at IoU 0.25 and 0.5; the true cell labels
decoded the same way score F1@0.5 0.99 on synth2k's validation split: cells with two ships lose one).
A ``--dense-density`` head's density layer is read too (each label's per-token densities summed over
the tokens and rounded), and a ``--dense-image-count`` head's image-count layer (its logits averaged
over the tokens), each scored on the same count rows. A ``--dense-digits`` head's digit layer is
scored on the detection rows as well: the same cells the head says hold a ship, each box spelt from
its corners' digit classes (what a language model copying those digits would write). ``ship cells`` says where the ship count goes
wrong: scenes over- or under-counted, and the head's false ship cells next to a true one (one ship
lit in two cells) or not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fusar_edge.config import preset  # noqa: E402
from fusar_edge.evaluate.metrics import gt_boxes, match, prf  # noqa: E402
from fusar_edge.model.bundle import build_random  # noqa: E402
from fusar_edge.tokenizer import TextTokenizer  # noqa: E402
from fusar_edge.train.dense import (COUNT_CLASSES, LABELS, DenseHead, cell_boxes, cell_labels,  # noqa: E402
                                     load_truth)
from fusar_edge.train.samples import SampleBuilder, read_manifest  # noqa: E402
from vision_warmup import add_vision_args, vision_variant  # noqa: E402


def _saved_modules(run: Path, after_stage0: bool) -> dict[str, dict]:
    """``{"visual": state, "head": state, "tlm": state}`` from the warm-up's file or, with
    ``after_stage0``, from the end of stage 0's main loop (read once; "tlm" empty without TLM)."""
    if not after_stage0:
        saved = torch.load(run / "dense-warmup.pt", weights_only=True)
        return {name: saved.get(name, {}) for name in ("visual", "head", "tlm")}
    params = torch.load(run / "checkpoint" / "state.pt", map_location="cpu", weights_only=True)["params"]
    modules = {name: {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
               for name, prefix in (("visual", "backbone.model.visual."), ("head", "dense_head."), ("tlm", "tlm."))}
    if not modules["visual"]:  # `train --freeze-vision`: the checkpoint holds trained modules only; the tower is the warm-up's
        modules["visual"] = _saved_modules(run, after_stage0=False)["visual"]
    return modules


def _load(model, head, saved: dict[str, dict]) -> None:
    for name, module in (("visual", model.visual), ("head", head), ("tlm", model.tlm)):
        if module is not None:
            # not strict: a --dense-position head has a layer more than the probe reads; what it reads must be there
            assert not module.load_state_dict(saved[name], strict=False).missing_keys


def _tally_ship_cells(tally: dict[str, int], got: torch.Tensor, want: torch.Tensor, grid: tuple[int, int]) -> None:
    """Where the ship count goes wrong: scenes over / under counted, and the cells the head marks
    with no ship centre, split by whether a true ship cell is one of their eight neighbours (a ship
    across a cell border lit twice) or not (a false alarm)."""
    got_n, want_n = int(got.sum()), int(want.sum())
    tally["scenes over"] += int(got_n > want_n)
    tally["scenes under"] += int(got_n < want_n)
    marked, true = (got > 0).view(*grid), (want > 0).view(*grid)
    near_true = torch.nn.functional.max_pool2d(true.float()[None, None], 3, 1, 1)[0, 0] > 0
    false = marked & ~true
    tally["false cells"] += int(false.sum())
    tally["false cells next to a true one"] += int((false & near_true).sum())
    tally["missed cells"] += int((true & ~marked).sum())
    tally["true cells found"] += int((true & marked).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a stage-0 OUT holding dense-warmup.pt")
    p.add_argument("--data", type=Path, required=True, help="the dataset (stage1-SPLIT.jsonl, scenes.jsonl)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="scenes to read (default test)")
    p.add_argument("--preset", default="demo", help="the run's architecture preset (default demo)")
    p.add_argument("--after-stage0", action="store_true",
                   help="read the modules at the end of stage 0's main loop (OUT/checkpoint/state.pt)")
    p.add_argument("--limit", type=int, help="at most this many scenes")
    p.add_argument("--no-aef", action="store_true", help="the run was trained with --no-aef")
    add_vision_args(p)  # the run's ViT variant, as benchmarks/vision_warmup.py was given it
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = vision_variant(preset(a.preset), a)
    cfg.tlm.enabled = not a.no_aef
    model = build_random(cfg, seed=0).eval()
    # a --dense-density head has a density layer, a --dense-image-count head an image-count layer:
    # read them too (the density's sum over the tokens is a count; the image-count layer reads one)
    saved = _saved_modules(a.run, a.after_stage0)
    head = DenseHead(cfg.hidden_size, density_weight=float("density.weight" in saved["head"]),
                     image_count_weight=float("image_count.weight" in saved["head"]),
                     digits_weight=float("digits.weight" in saved["head"]))
    _load(model, head, saved)
    density_by_scene: dict[str, dict[str, int]] = {}
    image_count_by_scene: dict[str, dict[str, int]] = {}
    builder = SampleBuilder(cfg, TextTokenizer.demo(), use_anchors=not a.no_aef)
    truth = load_truth(a.data / "scenes.jsonl")
    hits: dict[str, list[int]] = {}
    ceiling: dict[str, list[int]] = {}
    got_by_scene: dict[str, dict[str, int]] = {}
    boxes_by_scene: dict[str, list[dict]] = {}
    digit_boxes_by_scene: dict[str, list[dict]] = {}
    ship_cells = {"scenes over": 0, "scenes under": 0, "false cells": 0, "false cells next to a true one": 0,
                  "missed cells": 0, "true cells found": 0}
    rows = list(read_manifest(a.data / f"stage1-{a.split}.jsonl"))[:a.limit]  # one row per scene
    with torch.no_grad():
        for row in rows:
            tokens = model.vision_many([builder.image_inputs(row)])[0]
            n = len(LABELS) * COUNT_CLASSES
            out = head.proj(tokens.float())
            cls = out[:, :n].reshape(-1, len(LABELS), COUNT_CLASSES).argmax(-1)
            boxes_by_scene[row["scene"]] = [{"bbox_2d": b, "label": "ship"} for b in cell_boxes(
                cls[:, LABELS.index("ship")] > 0, out[:, -4:], cfg.chip_size, cfg.token_grid)]
            if head.digits is not None:
                ship_cells_marked = torch.nonzero(cls[:, LABELS.index("ship")] > 0).flatten()
                spelt = head.read_digits(tokens)
                digit_boxes_by_scene[row["scene"]] = [{"bbox_2d": spelt[c].tolist(), "label": "ship"}
                                                      for c in ship_cells_marked.tolist()]
            true_cls = cell_labels(truth[row["scene"]], cfg.chip_size, cfg.token_grid)[0]
            _tally_ship_cells(ship_cells, cls[:, LABELS.index("ship")], true_cls[:, LABELS.index("ship")],
                              cfg.token_grid)
            got_by_scene[row["scene"]] = {}
            if head.density is not None:
                sums = head.density(tokens.float()).sum(0)
                density_by_scene[row["scene"]] = {lab: max(0, round(float(sums[i]))) for i, lab in enumerate(LABELS[:3])}
            if head.image_count is not None:
                read = head.read_image_counts(tokens)
                image_count_by_scene[row["scene"]] = {lab: int(read[i]) for i, lab in enumerate(LABELS[:3])}
            for i, label in enumerate(LABELS[:3]):
                got = int(cls[:, i].sum())
                got_by_scene[row["scene"]][label] = got
                want = sum(t["label"] == label for t in truth[row["scene"]])
                hits.setdefault(f"{label} / {row['group']}", []).append(int(got == want))
                ceiling.setdefault(label, []).append(int(int(true_cls[:, i].sum()) == want))
    report = {k: {"scenes": len(v), "exact": round(sum(v) / len(v), 3)} for k, v in sorted(hits.items())}
    report["ceiling (true cell classes)"] = {k: round(sum(v) / len(v), 3) for k, v in ceiling.items()}
    report["ship cells (scenes; cells the head marks or misses)"] = ship_cells
    # the stage-2 count rows of the same scenes, scored as `fusar-edge eval` scores counting
    label_of = {lab.replace(" ", "_"): lab for lab in LABELS[:3]}
    errs: dict[str, list[int]] = {}
    density_errs: dict[str, list[int]] = {}
    image_count_errs: dict[str, list[int]] = {}
    stage2 = read_manifest(a.data / f"stage2-{a.split}.jsonl")  # the split's task rows, read once
    for row in stage2:
        if row.get("task") != "count" or row["scene"] not in got_by_scene:
            continue
        label = label_of[row["id"].rsplit("count-", 1)[1]]
        err = abs(got_by_scene[row["scene"]][label] - int(row["answer"]))
        for key in ("all", row["group"], label):
            errs.setdefault(key, []).append(err)
            for by_scene, table in ((density_by_scene, density_errs), (image_count_by_scene, image_count_errs)):
                if row["scene"] in by_scene:
                    table.setdefault(key, []).append(abs(by_scene[row["scene"]][label] - int(row["answer"])))
    # the split's detection rows, scored as `fusar-edge eval` scores them (raw chip coordinates)
    for name, by_scene in (("detect rows (ship boxes from the head)", boxes_by_scene),
                           ("detect rows (ship boxes spelt by the digit layer)", digit_boxes_by_scene)):
        if not by_scene:
            continue
        det = {t: [0, 0, 0] for t in (0.25, 0.5)}
        for row in stage2:
            if row.get("task") == "detect" and row["scene"] in by_scene:
                preds, gts = by_scene[row["scene"]], gt_boxes(row["answer"])
                for t in det:
                    det[t] = [det[t][0] + match(preds, gts, t), det[t][1] + len(preds), det[t][2] + len(gts)]
        report[name] = {f"iou{t}": {k: round(v, 3) for k, v in prf(*det[t]).items()} for t in det}
    for name, table in (("count rows", errs), ("count rows (density sum, rounded)", density_errs),
                        ("count rows (image-count layer)", image_count_errs)):
        if table:
            report[name] = {k: {"n": len(v), "exact": round(sum(e == 0 for e in v) / len(v), 3),
                                "mae": round(sum(v) / len(v), 3)} for k, v in table.items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
