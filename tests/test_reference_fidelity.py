"""A FUSAR-GPT checkpoint answers exactly as the reference inference does.

The checkpoint is laid out as the reference training (``train_tlm.py``) saves it, built from the
tiny preset: a base Qwen2.5-VL folder with a ``generation_config.json`` like Qwen2.5-VL-Instruct's
(``repetition_penalty``), a PEFT LoRA (r 8, alpha 32, dropout 0.05) whose ``target_modules`` are
the full names of every language-model q/k/v/o/gate/up/down linear, ``vec64_film.pt`` and
``tlm_config.json``.

The reference inference is re-implemented here, independently of fusar-edge's code path
(``infer_val.py``): transformers' ``Qwen2_5_VLForConditionalGeneration`` +
``PeftModel.from_pretrained`` (unmerged), a forward hook on the vision tower that applies TLM as
the reference's ``TLMModel._modulate`` does, Qwen's chat template and image processor, and
``generate(do_sample=False)``. ``fusar-edge ask`` on the imported bundle must produce the same
token ids, with the torch backend and with the fp32 ONNX export.
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fusar_edge.cli import main
from fusar_edge.config import preset
from fusar_edge.model.bundle import build_random
from fusar_edge.tasks import DETECT_PROMPT
from fusar_edge.tokenizer import TextTokenizer
from test_import_fusar_gpt import reference_film_mlp

# Qwen2.5-VL-*-Instruct ships 1.05; a random tiny model's loops can outlast that, so a stronger
# penalty makes sure the comparison depends on it (test_the_comparison_can_fail)
PENALTY = 1.3
SIGMA = 2.0
NEW_TOKENS = 40
SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUESTIONS = [  # (what the user types, fusar-edge flags, what the reference manifest's question holds)
    ("<image> How many ships are there in this image? ", [], "How many ships are there in this image?"),
    ("find ships", ["--task", "detect", "--label", "ship"], DETECT_PROMPT.replace("{label}", "ship")),
]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from peft import LoraConfig, TaskType, get_peft_model

    root = tmp_path_factory.mktemp("reference-ckpt")
    cfg = preset("tiny")
    cfg.tlm.enabled = cfg.grasp.enabled = False
    base = build_random(cfg, seed=31).backbone
    base.save_pretrained(root / "base")
    TextTokenizer.tiny().save(root / "base")
    ids = {"bos_token_id": 0, "pad_token_id": 0, "eos_token_id": [2, 0]}  # the tiny vocabulary's ids
    (root / "base" / "generation_config.json").write_text(json.dumps(
        {**ids, "do_sample": True, "repetition_penalty": PENALTY, "temperature": 0.1, "top_p": 0.001, "top_k": 1,
         "transformers_version": "4.49.0"}, indent=2))

    # train_tlm.py's targets: every LLM linear by full name, the vision tower excluded
    targets = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)
               and n.endswith(SUFFIXES) and "visual" not in n.split(".")]
    assert len(targets) == 2 * 7 and all("language_model" in t for t in targets)
    torch.manual_seed(30)  # LoRA A is initialised from the global generator: the same checkpoint every run
    peft_model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=targets, r=8,
                                                 lora_alpha=32, lora_dropout=0.05, bias="none"))
    gen = torch.Generator().manual_seed(32)
    with torch.no_grad():  # B starts at zero in PEFT: give the adapter an effect
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(root / "lora")

    (root / "tlm").mkdir()
    film = reference_film_mlp(64, seed=33)
    torch.save({"film_mlp": film.state_dict()}, root / "tlm" / "vec64_film.pt")
    (root / "tlm" / "tlm_config.json").write_text(json.dumps(
        {"format": "tlm_original_train_patch_resize_v1", "sigma": SIGMA, "hidden_mult": 4, "image_size": 224,
         "vec_dim": 64}))

    rng = np.random.default_rng(34)  # an 8-bit gray rendering of another size: the reference resizes it
    image = root / "chip.png"
    Image.fromarray(rng.integers(0, 256, (250, 310), dtype=np.uint8), "L").save(image)
    features = rng.normal(size=(20, 64)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    anchors = root / "anchors.npz"
    np.savez(anchors, features=features, positions=rng.random((20, 2)).astype(np.float32))
    return SimpleNamespace(root=root, base=root / "base", lora=root / "lora", tlm=root / "tlm", image=image,
                           anchors=anchors)


# --- the reference inference, re-implemented -----------------------------------------------------

QWEN_CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
             "<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n")


def reference_tlm_hook(film, anchors_npz, sigma, merge=2):
    """The reference's TLM on the vision tower's merged output (``pooler_output`` in transformers 5)."""
    with np.load(anchors_npz) as npz:
        vectors = torch.from_numpy(npz["features"].copy())
        positions = torch.from_numpy(npz["positions"].copy())
    mask = torch.ones(len(vectors))

    def hook(module, inputs, output):
        tokens = output.pooler_output
        (_, hp, wp), = inputs[1].tolist() if len(inputs) > 1 else module._grid
        h, w = hp // merge, wp // merge
        gamma, beta = film(vectors).chunk(2, dim=-1)
        yy, xx = torch.meshgrid(torch.arange(hp, dtype=torch.float32), torch.arange(wp, dtype=torch.float32),
                                indexing="ij")
        d2 = (positions[:, 0, None] * (hp - 1) - yy.flatten()) ** 2 + (positions[:, 1, None] * (wp - 1) - xx.flatten()) ** 2
        weights = torch.exp(-d2 / (2 * sigma ** 2))
        weights = weights / (weights.sum(0, keepdim=True) + 1e-6)
        weights = weights * mask[:, None]
        weights = weights / (weights.sum(0, keepdim=True) + 1e-6)

        def field(v):
            f = (weights.T @ v).view(1, hp, wp, -1).permute(0, 3, 1, 2)
            f = torch.nn.functional.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
            return f.permute(0, 2, 3, 1).reshape(h * w, -1)

        output.pooler_output = tokens * (1 + field(gamma)) + field(beta)
        return output

    return hook


def reference_generate(ckpt, question, max_new_tokens=NEW_TOKENS):
    from peft import PeftModel
    from tokenizers import Tokenizer
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt.base, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, ckpt.lora).eval()
    film = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.SiLU(), torch.nn.Linear(256, 128))
    film.load_state_dict(torch.load(ckpt.tlm / "vec64_film.pt", weights_only=True)["film_mlp"])
    visual = base.model.visual
    handle = visual.register_forward_hook(reference_tlm_hook(film, ckpt.anchors, SIGMA), with_kwargs=False)
    try:
        with Image.open(ckpt.image) as im:  # data.build_prompt: RGB, bicubic to the TLM image size
            image = im.convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
        vision = Qwen2VLImageProcessorPil()(images=[image], return_tensors="pt")
        grid = vision["image_grid_thw"]
        visual._grid = grid.tolist()  # the hook reads the grid from here when it is passed as a keyword
        n_image = int(grid.prod()) // 4
        text = QWEN_CHAT.format(question=question.replace("<image>", "").strip())
        text = text.replace("<|image_pad|>", "<|image_pad|>" * n_image)
        tok = Tokenizer.from_file(str(ckpt.base / "tokenizer.json"))
        ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids])
        # Qwen2_5_VLProcessor also returns mm_token_type_ids (1 on image tokens); transformers 5
        # computes the M-RoPE positions only when it is given
        mm = (ids == tok.token_to_id("<|image_pad|>")).int()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                                 pixel_values=vision["pixel_values"], image_grid_thw=grid,
                                 max_new_tokens=max_new_tokens, do_sample=False, use_cache=True)
    finally:
        handle.remove()
    new = out[0, ids.shape[1]:].tolist()
    return new[:-1] if new and new[-1] in (2, 0) else new  # fusar-edge reports ids without the stop token


# --- fusar-edge -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundles(ckpt):
    from fusar_edge.export.bundle_export import export_bundle

    bundle = ckpt.root / "bundle"
    assert main(["import-fusar-gpt", str(ckpt.base), str(ckpt.lora), str(ckpt.tlm), "--out", str(bundle)]) == 0
    onnx = ckpt.root / "bundle-onnx"
    export_bundle(bundle, onnx, onnx=True, parity_prompts=1)
    return SimpleNamespace(torch=bundle, onnx=onnx)


def ask_ids(capsys, ckpt, bundle, question, flags, *extra):
    argv = ["ask", str(ckpt.image), question, "--bundle", str(bundle), "--anchors", str(ckpt.anchors),
            "--max-new-tokens", str(NEW_TOKENS), "--json", "--device", "cpu", *flags, *extra]  # fp32, as the reference
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_imported_bundle_carries_the_reference_settings(ckpt, bundles):
    for bundle in (bundles.torch, bundles.onnx):
        fusar = json.loads((bundle / "fusar.json").read_text())
        assert fusar["max_new_tokens"] == 2048 and fusar["prompt_style"] == "reference"
        assert (bundle / "generation_config.json").read_bytes() == (ckpt.base / "generation_config.json").read_bytes()


@pytest.mark.parametrize("question, flags, sent", QUESTIONS)
def test_ask_gives_the_reference_token_ids(ckpt, bundles, capsys, question, flags, sent):
    want = reference_generate(ckpt, sent)
    assert len(want) >= 5
    got = ask_ids(capsys, ckpt, bundles.torch, question, flags)
    assert got["model"]["prompt"] == sent
    assert got["model"]["generation"]["repetition_penalty"] == PENALTY and got["anchor"]["tlm"] == "applied"
    assert got["token_ids"] == want
    onnx = ask_ids(capsys, ckpt, bundles.onnx, question, flags, "--backend", "onnxruntime")
    assert onnx["model"]["onnx"] == "onnx"
    assert onnx["token_ids"] == want


def test_the_comparison_can_fail(ckpt, bundles, capsys):
    """Without the checkpoint's repetition penalty, or with a template around the question, the ids differ."""
    question, flags, sent = QUESTIONS[0]
    want = reference_generate(ckpt, sent)
    no_penalty = ask_ids(capsys, ckpt, bundles.torch, question, flags, "--repetition-penalty", "1.0")
    assert no_penalty["model"]["generation"]["repetition_penalty"] == 1.0
    assert no_penalty["token_ids"] != want
    templated = reference_generate(ckpt, "This is a SAR image. " + sent)
    assert templated != want
