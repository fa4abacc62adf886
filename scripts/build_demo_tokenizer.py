"""Build the demo preset's tokenizer (fusar_edge/assets/demo_tokenizer.json).

A byte-level BPE like Qwen2.5's, and like it with **every digit its own token** (Qwen's
pre-tokenizer splits numbers into single digits; box coordinates then have one spelling),
trained with the `tokenizers` library on the phrases the synthetic dataset uses
(fusar_edge/data/questions.py, the reference detection prompt). Qwen2.5-VL's chat and
vision special tokens sit at ids 0..7 (``fusar_edge.config.TINY_SPECIAL_TOKENS``).
Byte-level, so any text round-trips. Deterministic: re-running it reproduces the file.

    python scripts/build_demo_tokenizer.py
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fusar_edge.config import TINY_SPECIAL_TOKENS
from fusar_edge.data import questions
from fusar_edge.data.scene import COVER, DISTRACTOR_LABELS, TARGET_LABELS
from fusar_edge.tasks import DETECT_PROMPT, GRID_CELLS

DEMO_VOCAB_SIZE = 768


def corpus() -> list[str]:
    labels = list(TARGET_LABELS) + list(DISTRACTOR_LABELS)
    cells = [c for row in GRID_CELLS for c in row]
    lines = [DETECT_PROMPT.replace("{label}", lab) for lab in labels]
    for lab in TARGET_LABELS:
        p = questions.PLURAL[lab]
        lines += [q.format(p=p) for q in questions.COUNT_QUESTIONS]
        lines += [q.format(l=lab) for q in questions.LOCATE_QUESTIONS]
    lines += [q.format(box="[12, 34, 56, 78]") for q in questions.CLASSIFY_QUESTIONS]
    lines += list(questions.CAPTION_QUESTIONS)
    lines += [f"A SAR image of {k}: {c} 60%, {d} 40%." for k in ("open sea", "coastline", "inland terrain")
              for c in COVER for d in COVER]
    lines += [f"Water lies at the {a}, {b}." for a in cells for b in cells]
    lines += [f"{n} {lab} at the {c}." for n in range(1, 8) for lab in labels + ["ships", "oil tanks", "buildings",
                                                                                 "rocks"] for c in cells]
    lines += ["A runway crosses the scene.", "No ships, aircraft or oil tanks.", "None",
              '[{"bbox_2d": [1, 2, 3, 4], "label": "ship"}, {"bbox_2d": [5, 6, 7, 8], "label": "ship"}]',
              "You are a helpful assistant.", "system user assistant"]
    return lines


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    specials = sorted(TINY_SPECIAL_TOKENS, key=TINY_SPECIAL_TOKENS.get)
    trainer = trainers.BpeTrainer(vocab_size=DEMO_VOCAB_SIZE, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus() * 4, trainer=trainer)
    for name, idx in TINY_SPECIAL_TOKENS.items():
        assert tok.token_to_id(name) == idx, (name, tok.token_to_id(name))
    return tok


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "fusar_edge" / "assets" / "demo_tokenizer.json"
    build().save(str(out))
    print(f"wrote {out}")
