"""The training loop: AdamW, linear warm-up then linear decay, gradient accumulation, resume.

The reference trains with transformers' ``Trainer`` (batch 1 per device, ``adamw_torch``,
``warmup_ratio 0.05``, linear schedule, gradient accumulation). This loop does the same for
one process, written out because our forward is the three FUSAR stages rather than a
transformers model call, and so that a run on a 2-core CPU can be resumed mid-epoch.

Order: sample ``k`` of the run is row ``perm_e[k % N]`` of epoch ``e = k // N``, with
``perm_e`` a permutation seeded by ``(seed, e)``: a resumed run sees exactly the samples the
uninterrupted one would have. With ``group_by_image`` a "sample" is instead every row of one
image (and anchor set): the vision tower runs once for them and the loss is their mean. That is
ours, not the reference's (batch 1): in stage 0 the ViT's forward and backward cost as much as
the language model's over ~5 rows, so sharing it trains the demo about twice as fast. A checkpoint (trainable tensors, optimizer, step, loss history)
is written atomically to ``<out>/checkpoint/`` every ``save_every`` optimizer steps and at the
end; ``train`` resumes from it when it matches the run's settings.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DivergedError, InputError

CHECKPOINT = "checkpoint"


@dataclass
class TrainSettings:
    epochs: float
    lr: float
    grad_accum: int = 4
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    save_every: int = 200  # optimizer steps between checkpoints
    group_by_image: bool = False  # one sample = all rows of one image, sharing one vision forward
    # {class: k}: a sample whose question names the class is drawn k times per epoch (ours, see oversampled)
    oversample: dict[str, int] | None = None

    def check(self) -> None:
        if not self.epochs > 0:
            raise InputError(f"--epochs: expected a positive number, got {self.epochs}")
        if not self.lr > 0:
            raise InputError(f"--lr: expected a positive number, got {self.lr}")
        if self.grad_accum < 1:
            raise InputError(f"--grad-accum: expected a positive integer, got {self.grad_accum}")
        for label, k in (self.oversample or {}).items():
            if not (isinstance(k, int) and k >= 1):
                raise InputError(f"--oversample {label}: expected a whole number of draws >= 1, got {k!r}")

    def identity(self) -> dict:
        """The settings as a checkpoint's run id holds them (no oversampling: as before it existed, so
        older checkpoints still resume)."""
        return {k: v for k, v in asdict(self).items() if not (k == "oversample" and not v)}


def sample_loss(model, sample) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (and the stop) of one sample."""
    return group_loss(model, [sample])


def group_loss(model, samples: list, extra: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Mean of the answer losses of samples that share one image and anchor set (one vision forward).

    ``extra(visual_tokens)``: a further loss on the image's visual tokens (stage 0's dense term).
    """
    first = samples[0]
    visual = model.vision(first.pixels, first.grid_thw, first.anchors)
    loss = torch.stack([answer_loss(model, s, visual) for s in samples]).mean()
    return loss if extra is None else loss + extra(visual)


def image_groups(rows: list[dict]) -> list[list[int]]:
    """Row indices grouped by (image, anchors), in order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((row.get("_root"), row["image"], row.get("aef")), []).append(i)
    return list(groups.values())


def oversampled(units: list[list[int]], rows: list[dict], oversample: dict[str, int] | None) -> list[list[int]]:
    """``units`` with each unit whose rows' questions name a class of ``oversample`` repeated, so that it
    is drawn that many times per epoch (the largest factor when its rows name several).

    Ours, not the reference's: the demo's training set asks about aircraft in one scene of ten (its
    20 airfield regions of 160), and the language model, fully trained in stage 0, answered most
    aircraft counts with one favourite number while counting ships at 0.82; drawing aircraft scenes
    8x as often in stage 0, at the same steps, lifted its aircraft counting from 0.30 to 0.53 and all
    counting from 0.681 to 0.726 (benchmarks/results/eval-demo-recipes-vm.md, "Where the counting gap
    is"). The class is the one
    ``tasks.extract_label`` reads from the question (singular, lower case: ``aircraft``, ``oil tank``).
    """
    if not oversample:
        return units
    from ..tasks import extract_label

    named = [extract_label(str(row.get("question") or "")) for row in rows]
    factor = [max((oversample.get(named[i] or "", 1) for i in unit), default=1) for unit in units]
    # the repeats in rounds (every unit drawn twice, then those drawn three times, ...): the order the
    # measured runs used, so that the same seed draws the same samples
    return units + [u for r in range(2, max(factor, default=1) + 1) for u, k in zip(units, factor) if k >= r]


def answer_loss(model, sample, visual: torch.Tensor) -> torch.Tensor:
    embeds, _ = model.fusion(sample.input_ids, sample.layout, visual, sample.question_ids)
    out = model.language_model(inputs_embeds=embeds, position_ids=sample.positions.to(model.device),
                               use_cache=False)
    labels = sample.labels[1:].to(model.device)
    keep = labels != -100
    logits = model.lm_head(out.last_hidden_state[0, :-1][keep]).float()  # the head only where there is a loss
    return F.cross_entropy(logits, labels[keep])


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def train(model, named_params: dict[str, torch.nn.Parameter], rows: list, build: Callable, settings: TrainSettings,
          out: Path, show_progress: bool = True, log: Callable[[dict], None] | None = None,
          aux: Callable[[torch.Tensor, dict], torch.Tensor] | None = None) -> dict:
    """Train ``named_params`` of ``model`` on ``rows`` (``build(row) -> Sample``); returns the loss history.

    ``aux(visual_tokens, row)``: an extra loss on each sample's visual tokens (``row`` is the
    sample's first row); its parameters must be among ``named_params``.
    """
    settings.check()
    units = image_groups(rows) if settings.group_by_image else [[i] for i in range(len(rows))]
    units = oversampled(units, rows, settings.oversample)
    n = len(units)
    total_samples = max(1, int(round(settings.epochs * n)))
    total_steps = math.ceil(total_samples / settings.grad_accum)
    warmup = max(1, int(math.ceil(settings.warmup_ratio * total_steps)))
    params = list(named_params.values())
    optim = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: _lr_factor(s, total_steps, warmup))
    ckpt_dir = Path(out) / CHECKPOINT
    run_id = {"n_rows": len(rows), "n_units": n, "settings": settings.identity(), "params": sorted(named_params)}
    state = {"sample": 0, "step": 0, "history": []}
    if (ckpt_dir / "state.pt").is_file():
        saved = torch.load(ckpt_dir / "state.pt", map_location="cpu", weights_only=True)
        if json.loads(saved["run_id"]) != run_id:
            raise InputError(f"{ckpt_dir}: a checkpoint of a different run (other data or settings); remove it or "
                             "choose another --out")
        with torch.no_grad():
            for name, p in named_params.items():
                p.copy_(saved["params"][name])
        optim.load_state_dict(saved["optim"])
        sched.load_state_dict(saved["sched"])
        state = {"sample": int(saved["sample"]), "step": int(saved["step"]), "history": list(saved["history"])}

    def save() -> None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tmp = ckpt_dir / "state.pt.tmp"
        torch.save({"run_id": json.dumps(run_id), "params": {k: p.detach().cpu() for k, p in named_params.items()},
                    "optim": optim.state_dict(), "sched": sched.state_dict(), "sample": state["sample"],
                    "step": state["step"], "history": state["history"]}, tmp)
        os.replace(tmp, ckpt_dir / "state.pt")

    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", file=sys.stderr,
                   dynamic_ncols=True)
    model.train()
    perm_epoch, perm = -1, None
    ema = None
    t0 = time.perf_counter()
    try:
        while state["sample"] < total_samples:
            acc_loss, in_step = 0.0, 0
            optim.zero_grad(set_to_none=True)
            while in_step < settings.grad_accum and state["sample"] < total_samples:
                k = state["sample"]
                epoch = k // n
                if epoch != perm_epoch:
                    perm_epoch, perm = epoch, np.random.default_rng([settings.seed, epoch]).permutation(n)
                unit = units[int(perm[k % n])]
                extra = None if aux is None else (lambda visual, row=rows[unit[0]]: aux(visual, row))
                loss = group_loss(model, [build(rows[i]) for i in unit], extra)
                if not torch.isfinite(loss):
                    raise DivergedError(f"training: the loss is {float(loss)} at sample {k + 1} (row "
                                        f"{rows[unit[0]].get('id', unit[0])}); try a lower --lr")
                (loss / settings.grad_accum).backward()
                acc_loss += float(loss.detach())
                in_step += 1
                state["sample"] += 1
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optim.step()
            sched.step()
            state["step"] += 1
            step_loss = acc_loss / in_step
            ema = step_loss if ema is None else 0.95 * ema + 0.05 * step_loss
            entry = {"step": state["step"], "epoch": round(state["sample"] / n, 4), "loss": round(step_loss, 5),
                     "lr": optim.param_groups[0]["lr"]}
            state["history"].append(entry)
            if log:
                log(entry)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.4f}", epoch=f"{entry['epoch']:.2f}")
            if state["step"] % settings.save_every == 0:
                save()
    finally:
        if bar is not None:
            bar.close()
    save()
    model.eval()
    return {"steps": state["step"], "samples": state["sample"],
            "sample_is": "all rows of one image" if settings.group_by_image else "one row", "seconds": round(time.perf_counter() - t0, 1),
            "history": state["history"]}
