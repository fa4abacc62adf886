"""Toy: how many examples does the demo's language model need to read a token's place?

    python benchmarks/position_readout_toy.py place 1500     # tokens carry their place (as --dense-position)
    python benchmarks/position_readout_toy.py none 1500      # M-RoPE alone

A fresh ``demo`` language model (random init, seed 0, one thread) gets the prompt of a real locate
row of ``data/synth2k`` (its layout and M-RoPE positions) with the 64 image tokens replaced by
noise, plus (``place``) a fixed random component per place of norm ~18 (the size measured on the
``pos5`` run's tokens) and, at one random place, a "target" component. It is trained (AdamW 1e-3,
batches of 16) to write the first token of that place's 3x3 cell word (``top``..., ``cen``,
``left``, ``right``: five classes, the most common a third of them), and scored every 250 steps on
256 fresh examples. benchmarks/results/eval-demo-recipes-vm.md has what it printed.
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fusar_edge.config import preset  # noqa: E402
from fusar_edge.data.questions import cell_of  # noqa: E402
from fusar_edge.model.bundle import build_random  # noqa: E402
from fusar_edge.tokenizer import TextTokenizer  # noqa: E402
from fusar_edge.train.samples import SampleBuilder, read_manifest  # noqa: E402

if len(sys.argv) != 3 or sys.argv[1] not in ("place", "none"):
    raise SystemExit("usage: position_readout_toy.py place|none STEPS")
torch.set_num_threads(1); torch.manual_seed(0)
use_place = sys.argv[1] == "place"
cfg = preset("demo"); cfg.tlm.enabled = False
model = build_random(cfg, seed=0); tok = TextTokenizer.demo()
b = SampleBuilder(cfg, tok, use_anchors=False)
row = [r for r in read_manifest(Path("data/synth2k/stage2-train.jsonl")) if r["task"] == "locate"][0]
s = b(row)
first = int((s.labels != -100).nonzero()[0]); st, n = s.layout.image_start, s.layout.image_len
ids = s.input_ids[:first].clone(); pos = s.positions[..., :first]
words = ["top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right"]
first_tok = {w: tok.encode(w)[0] for w in words}
C = cfg.hidden_size
gh, gw = cfg.token_grid
cell_h, cell_w = cfg.chip_size / gh, cfg.chip_size / gw
P = torch.randn(n, C) * (18 / C ** 0.5)     # the place component of each token (norm ~18, as measured)
T = torch.randn(C) * (10 / C ** 0.5)         # "a ship is here"
lm, head = model.language_model, model.lm_head
params = list(lm.parameters()) + list(head.parameters())
opt = torch.optim.AdamW(params, lr=1e-3)
def batch(k):
    cells = torch.randint(0, n, (k,))
    X = torch.randn(k, n, C) * (20 / C ** 0.5) + (P if use_place else 0)
    X[torch.arange(k), cells] += T
    boxes = [[(c % gw) * cell_w, (c // gw) * cell_h, (c % gw + 1) * cell_w, (c // gw + 1) * cell_h] for c in cells.tolist()]
    y = torch.tensor([first_tok[cell_of(box, cfg.chip_size)] for box in boxes])
    return X, y
def forward(X):
    e = lm.embed_tokens(ids.view(1, -1)).repeat(X.shape[0], 1, 1).clone()
    e[:, st:st + n] = X
    h = lm(inputs_embeds=e, position_ids=pos.expand(3, X.shape[0], -1), use_cache=False).last_hidden_state[:, -1]
    return head(h)
t0 = time.time()
for step in range(int(sys.argv[2])):
    X, y = batch(16)
    loss = torch.nn.functional.cross_entropy(forward(X), y)
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 250 == 0 or step == int(sys.argv[2]) - 1:
        with torch.no_grad():
            Xt, yt = batch(256); acc = float((forward(Xt).argmax(-1) == yt).float().mean())
        print(f"step {step} loss {loss.item():.3f} held-out first-token accuracy {acc:.3f} ({time.time()-t0:.0f} s)", flush=True)
