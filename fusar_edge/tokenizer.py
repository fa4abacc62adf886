"""Text tokenizer and the Qwen2.5-VL chat sequence.

Bundles carry their checkpoint's ``tokenizer.json`` (read with the ``tokenizers``
library, nothing downloaded); the ``tiny`` preset ships a small byte-level BPE
(``assets/tiny_tokenizer.json``, built by ``scripts/build_tiny_tokenizer.py``).

The sequence is Qwen2.5-VL's chat template for one image and one question (what the
FUSAR-GPT reference gets from ``processor.apply_chat_template``), plus the GRASP slots::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n<|vision_start|>
    <|image_pad|> x T <|vision_end|> [GRASP slot x L] {question}<|im_end|>\\n<|im_start|>assistant\\n
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from .errors import BundleError

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, source: str):
        self._tok = tokenizer
        self.source = source
        self.ids = {}
        for name in SPECIALS:
            idx = tokenizer.token_to_id(name)
            if idx is None:
                raise BundleError(f"{source}: tokenizer lacks the Qwen2.5-VL special token {name}")
            self.ids[name] = idx
        # every added special token (Qwen's has more than SPECIALS): text holding one encodes as it
        added = tokenizer.get_added_tokens_decoder().values()
        self.special_tokens = tuple(sorted({t.content for t in added if t.special} | set(SPECIALS)))

    @classmethod
    def from_file(cls, path: str | Path) -> "TextTokenizer":
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"{path}: missing (bundles need their checkpoint's tokenizer.json)")
        try:
            return cls(Tokenizer.from_file(str(path)), str(path))
        except Exception as exc:  # tokenizers raises bare Exceptions on malformed JSON
            raise BundleError(f"{path}: not a valid tokenizers JSON file ({exc})") from None

    @classmethod
    def tiny(cls) -> "TextTokenizer":
        ref = resources.files("fusar_edge") / "assets" / "tiny_tokenizer.json"
        return cls(Tokenizer.from_str(ref.read_text(encoding="utf-8")), "tiny preset tokenizer")

    @classmethod
    def demo(cls) -> "TextTokenizer":
        """The demo preset's tokenizer (scripts/build_demo_tokenizer.py): digits one token each."""
        ref = resources.files("fusar_edge") / "assets" / "demo_tokenizer.json"
        return cls(Tokenizer.from_str(ref.read_text(encoding="utf-8")), "demo preset tokenizer")

    @classmethod
    def stand_in(cls, special_ids: dict[str, int]) -> "TextTokenizer":
        """The tiny tokenizer with its special tokens moved to ``special_ids`` (a real model's).

        For the random-weight presets at true size (``qwen2.5-vl-7b``): the sequence has the real
        special ids, image-token count and vocabulary width, so timings match the real model's
        up to a few prompt tokens; the text is meaningless, as the weights are.
        """
        ref = resources.files("fusar_edge") / "assets" / "tiny_tokenizer.json"
        data = json.loads(ref.read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
        for token in data["added_tokens"]:
            if token["content"] in special_ids:
                token["id"] = vocab[token["content"]] = int(special_ids[token["content"]])
        return cls(Tokenizer.from_str(json.dumps(data)), "stand-in tokenizer (tiny BPE, real special ids)")

    @property
    def vocab_size(self) -> int:
        """One past the highest id the tokenizer can decode (real checkpoints pad the embedding beyond it)."""
        return max(self._tok.get_vocab(with_added_tokens=True).values()) + 1

    @property
    def stop_ids(self) -> list[int]:
        return [self.ids[t] for t in STOP_TOKENS]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: Path) -> None:
        self._tok.save(str(Path(directory) / "tokenizer.json"))
        config = {"tokenizer_class": "Qwen2TokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                  "model_max_length": 32768, "clean_up_tokenization_spaces": False}
        (Path(directory) / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


@dataclass(frozen=True)
class SequenceLayout:
    """Where the image tokens and the GRASP prompt slots sit in the input sequence."""

    image_start: int
    image_len: int
    prompt_start: int  # first GRASP slot (== image end + 1, after <|vision_end|>)
    prompt_len: int  # 0 when GRASP is off


@dataclass
class ChatSequence:
    """Token ids as numpy int64 (the torch model takes them as they are; no torch needed here)."""

    input_ids: np.ndarray  # [L]
    layout: SequenceLayout
    question_ids: np.ndarray  # [n]: the question alone, for GRASP's text-only pass


def build_sequence(tok: TextTokenizer, question: str, num_image_tokens: int, prompt_len: int,
                   system_prompt: str) -> ChatSequence:
    head = tok.encode(f"<|im_start|>system\n{system_prompt}<|im_end|>\n<|im_start|>user\n<|vision_start|>")
    image = [tok.ids["<|image_pad|>"]] * num_image_tokens
    vend = [tok.ids["<|vision_end|>"]]
    # GRASP slots hold a placeholder id; fusion overwrites their embeddings with the prompt.
    slots = [tok.ids["<|endoftext|>"]] * prompt_len
    question_ids = tok.encode(question)
    tail = question_ids + tok.encode("<|im_end|>\n<|im_start|>assistant\n")
    ids = head + image + vend + slots + tail
    layout = SequenceLayout(image_start=len(head), image_len=num_image_tokens,
                            prompt_start=len(head) + num_image_tokens + 1, prompt_len=prompt_len)
    return ChatSequence(np.array(ids, dtype=np.int64), layout, np.array(question_ids, dtype=np.int64))
