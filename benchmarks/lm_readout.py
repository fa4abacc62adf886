"""Does a bundle's language model learn to read places from real visual tokens, given many examples?

    python benchmarks/lm_readout.py --bundle runs/grid-pos5/bundle --data data/synth16k \\
        --tasks locate,grid --steps 1500

The vision tower (+TLM) is frozen: each image's visual tokens are computed once and kept in memory
(64 x hidden float32 per image: 49 KB for the demo, 0.6 GB for synth16k's 12,955), so only the
language model trains, in batches of ``--batch`` rows (right-padded; causal attention keeps the
padding out of every real token's view), AdamW at a constant ``--lr``. That is ~15 training rows
a second on one thread, several times stage 0's rate, which pays a vision backward per image.
Every 200 steps it scores 96 validation rows per task teacher-forced: the share of rows whose
every answer token is the argmax ("exact"), the share of answer tokens that are ("tokens"), and
the share of the answer's digit tokens that are ("digits": for detection, the box coordinates
alone, without the JSON around them that any model learns first).
Grid rows (``stage0-grid-*.jsonl``) need a dataset made by this version of ``data synth``.

``--warmup OUT/dense-warmup.pt`` swaps in the vision tower and TLM of a dense warm-up (say, one
with ``--digits``) under the bundle's language model, to ask what the language model reads off
those tokens without a whole recipe run.

It asks the question benchmarks/position_readout_toy.py asks of noise tokens, on the real ones:
after how many examples does the readout jump? Results: benchmarks/results/eval-demo-recipes-vm.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fusar_edge.model.bundle import load_bundle  # noqa: E402
from fusar_edge.train.samples import SampleBuilder, read_manifest  # noqa: E402

SCORED = ("locate", "count", "classify", "grid", "detect")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", type=Path, default=Path("data/synth2k"), help="a `data synth` dataset")
    p.add_argument("--tasks", default="locate,grid", help="tasks trained on (default locate,grid)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=Path, help="a dense-warmup.pt (train --stage 0, benchmarks/vision_warmup.py) whose "
                                               "vision tower and TLM replace the bundle's (its language model stays)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rng = random.Random(0)
    model, tok = load_bundle(a.bundle)
    if a.warmup:  # the tokens of another warm-up, read by the bundle's language model as a starting point
        saved = torch.load(a.warmup, map_location="cpu", weights_only=True)
        model.visual.load_state_dict(saved["visual"])
        if model.tlm is not None:
            if "tlm" not in saved:
                raise SystemExit(f"--warmup {a.warmup}: a warm-up without TLM (--no-aef), but {a.bundle} has one")
            model.tlm.load_state_dict(saved["tlm"])
    builder = SampleBuilder(model.config, tok, use_anchors=model.config.tlm.enabled)
    digit_ids = torch.tensor([i for d in range(10) for i in tok.encode(str(d))])

    def rows(split: str) -> list[dict]:
        return read_manifest(a.data / f"stage2-{split}.jsonl") + read_manifest(a.data / f"stage0-grid-{split}.jsonl")

    tasks = set(a.tasks.split(","))
    train = [r for r in rows("train") if r["task"] in tasks]
    val = {t: [r for r in rows("val") if r["task"] == t][:96] for t in SCORED}
    visual: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    with torch.no_grad():
        for r in train + [r for rs in val.values() for r in rs]:
            if r["image"] not in visual:
                visual[r["image"]] = model.vision(*builder.image_inputs(r))
    print(f"visual tokens of {len(visual)} images in {time.perf_counter() - t0:.0f} s; {len(train)} training rows",
          flush=True)
    for q in model.parameters():
        q.requires_grad_(False)
    params = list(model.language_model.parameters()) + list(model.lm_head.parameters())
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)

    def forward(batch: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        samples = [builder(r) for r in batch]
        length = max(len(s.input_ids) for s in samples)
        embeds, positions, labels = [], [], []
        for s, r in zip(samples, batch):
            e, _ = model.fusion(s.input_ids, s.layout, visual[r["image"]], s.question_ids)
            pad = length - e.shape[1]
            embeds.append(F.pad(e, (0, 0, 0, pad)))
            positions.append(torch.cat([s.positions, s.positions[..., -1:] + torch.arange(1, pad + 1).view(1, 1, -1)], -1))
            labels.append(F.pad(s.labels, (0, pad), value=-100))
        h = model.language_model(inputs_embeds=torch.cat(embeds), position_ids=torch.cat(positions, 1),
                                 use_cache=False).last_hidden_state
        return model.lm_head(h[:, :-1]).float(), torch.stack(labels)[:, 1:]

    def score() -> dict:
        model.eval()
        out = {}
        with torch.no_grad():
            for task, rs in val.items():
                exact = right = total = digits_right = digits = 0
                for i in range(0, len(rs), a.batch):
                    logits, labels = forward(rs[i:i + a.batch])
                    keep, hit = labels != -100, logits.argmax(-1) == labels
                    exact += int((hit | ~keep).all(-1).sum())
                    right, total = right + int((hit & keep).sum()), total + int(keep.sum())
                    digit = torch.isin(labels, digit_ids)
                    digits_right, digits = digits_right + int((hit & digit).sum()), digits + int(digit.sum())
                out[task] = {"exact": round(exact / max(len(rs), 1), 3), "tokens": round(right / max(total, 1), 3),
                             "digits": round(digits_right / digits, 3) if digits else None}
        model.train()
        return out

    print("step 0:", score(), flush=True)
    t0 = time.perf_counter()
    for step in range(1, a.steps + 1):
        logits, labels = forward(rng.sample(train, a.batch))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 200 == 0 or step == a.steps:
            print(f"step {step} ({step * a.batch} examples, {time.perf_counter() - t0:.0f} s): loss {loss.item():.3f}",
                  score(), flush=True)


if __name__ == "__main__":
    main()
