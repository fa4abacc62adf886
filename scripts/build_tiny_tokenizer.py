"""Build the tiny preset's tokenizer (fusar_edge/assets/tiny_tokenizer.json).

A byte-level BPE like Qwen's, trained with the `tokenizers` library on a small built-in
corpus, with Qwen2.5-VL's chat and vision special tokens at fixed ids 0..7 (the ids
``fusar_edge.config.TINY_SPECIAL_TOKENS`` expects). Byte-level means any text
round-trips, so the untrained tiny model can emit any byte sequence. Deterministic:
re-running it reproduces the shipped file.

    python scripts/build_tiny_tokenizer.py
"""

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fusar_edge.config import TINY_SPECIAL_TOKENS, TINY_VOCAB_SIZE

CORPUS = """
This is a SAR image. Please carefully check the image and detect the following object: ship.
Output each detected target's bbox coordinates in JSON format. If there are no such targets in
the image, simply respond with None. How many ships are there in the image? There are 3 ships.
Where is the airplane? The plane is in the top-left of the image. What type of object is this?
It is an oil tank. Classify the scene: harbor, airport, bridge, storage tank, vehicle, building.
[{"bbox_2d": [102, 267, 161, 328], "label": "plane"}, {"bbox_2d": [149, 365, 207, 425], "label": "ship"}]
Synthetic aperture radar images show bright returns from metal structures and dark calm water.
The image shows a port with several vessels moored along the quay and a runway near the coast.
top bottom left right center upper lower middle corner none zero one two three four five six
seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 100 504 224 ```json ``` system user
assistant You are a helpful assistant. Describe the image. count locate classify detect caption
"""


def build() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = sorted(TINY_SPECIAL_TOKENS, key=TINY_SPECIAL_TOKENS.get)
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    for name, idx in TINY_SPECIAL_TOKENS.items():
        assert tok.token_to_id(name) == idx, (name, tok.token_to_id(name))
    return tok


if __name__ == "__main__":
    out = Path(__file__).resolve().parents[1] / "fusar_edge" / "assets" / "tiny_tokenizer.json"
    build().save(str(out))
    print(f"wrote {out}")
