"""fusar-edge's decoder beside the engines users compare it with, on one CPU, interleaved.

The language model of a preset (random weights, fixed seed: the one `fusar-edge export PRESET`
writes) runs a prompt of `--prompt` token ids, then exactly `--new-tokens` greedy tokens, in:

- `transformers` fp32: the baseline (Qwen2ForCausalLM holding the same weights; a forward over
  the prompt, then one forward per token over its KV cache: what `generate` does, without its
  per-step Python bookkeeping);
- `fusar-edge` ONNX Runtime: the bundle's `onnx-int4/` decoder (GPTQ 4-bit, MatMulNBits,
  accuracy level 4) through `OnnxStages`, as `ask --backend onnxruntime` runs it;
- `onnxruntime-genai` (when installed): its own builder's int4 model of the same checkpoint
  (`-p int4 -e cpu`, block size 128, accuracy level 4), its own generator;
- `llama.cpp` (when llama-cpp-python is installed and its source tree is given with
  `--llama-src`, for `convert_hf_to_gguf.py`): the checkpoint in GGUF, quantised to Q4_0.

Engines that are not installed are skipped with a note. Each round runs every engine once
(prefill + decode) after an idle gap (`--gap`: pools that spin after a run must not slow the
next engine), rounds are interleaved so that load from other work falls on all engines alike,
and the medians over rounds are reported with achieved read bandwidth (weight bytes read per
token x tokens/s) against this machine's measured read ceiling.

    python benchmarks/peers.py --bundle EXPORTED_BUNDLE [--preset small] [--rounds 40] [--threads 2]
        [--llama-src DIR/vendor/llama.cpp]
    python benchmarks/peers.py --bundle DIR-x --like qwen2.5-vl-3b --layers 4 ...   # scaled_decoder.py's model

EXPORTED_BUNDLE: `fusar-edge export small --out DIR --gptq4`. Writes
`benchmarks/results/peers-<preset>-<host>.json` and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# --- the shared checkpoint ---------------------------------------------------------------------

def save_text_checkpoint(config, tokenizer_json: Path, out: Path) -> dict:
    """The language model + LM head of ``config`` (random weights, the seed `fusar-edge export`
    builds presets with) as a Hugging Face Qwen2ForCausalLM checkpoint, with ``tokenizer_json``.

    Text tokens carry one position on all three M-RoPE axes, so Qwen2's 1-D RoPE computes the
    same thing for a text prompt; the other engines can only read a plain causal LM.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fusar_edge.model.bundle import build_random

    model = build_random(config)
    t = model.config.text
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    cfg = Qwen2Config(vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
                      intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_hidden_layers"],
                      num_attention_heads=t["num_attention_heads"], num_key_value_heads=t["num_key_value_heads"],
                      max_position_embeddings=t.get("max_position_embeddings", 4096), rms_norm_eps=t["rms_norm_eps"],
                      rope_theta=rope.get("rope_theta", t.get("rope_theta", 1e6)), tie_word_embeddings=False,
                      torch_dtype="float32")
    lm = Qwen2ForCausalLM(cfg)
    state = {f"model.{k}": v for k, v in model.language_model.state_dict().items()}
    state["lm_head.weight"] = model.lm_head.weight
    missing, unexpected = lm.load_state_dict(state, strict=False)
    if [m for m in missing if "rotary" not in m] or unexpected:
        raise RuntimeError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
    lm.save_pretrained(out, safe_serialization=True)
    # the tokenizer is only needed by converters that insist on one; ids are fed directly
    from fusar_edge.tokenizer import TextTokenizer

    TextTokenizer.from_file(tokenizer_json).save(out)
    weights = sum(p.numel() * 4 for n, p in lm.named_parameters() if "embed_tokens" not in n)
    return {"dir": str(out), "decoder_weight_bytes_fp32": int(weights), "vocab": t["vocab_size"]}


# --- engines: each returns (prefill_s, [decode step s], tokens) for one run ----------------------

class TransformersEngine:
    name = "transformers fp32 (baseline)"

    def __init__(self, ckpt: Path, threads: int):
        import torch
        from transformers import Qwen2ForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = Qwen2ForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
        self.weight_bytes = sum(p.numel() * 4 for n, p in self.model.named_parameters() if "embed_tokens" not in n)

    def run(self, prompt: list[int], new: int):
        torch = self.torch
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(input_ids=torch.tensor([prompt]), use_cache=True)
            tok = int(out.logits[0, -1].argmax())
            prefill = time.perf_counter() - t0
            past, toks, steps = _cache(out), [tok], []
            for _ in range(new - 1):
                t0 = time.perf_counter()
                out = self.model(input_ids=torch.tensor([[tok]]), cache=past, use_cache=True)
                past, tok = _cache(out), int(out.logits[0, -1].argmax())
                steps.append(time.perf_counter() - t0)
                toks.append(tok)
        return prefill, steps, toks


def _cache(out):
    """transformers 5 names the KV cache ``cache`` (``past_key_values`` before)."""
    return getattr(out, "cache", None) or out.past_key_values


class FusarOrtEngine:
    name = "fusar-edge onnxruntime (GPTQ 4-bit)"

    def __init__(self, bundle: Path, threads: int, variant: str = "onnx-int4"):
        from fusar_edge.backends.onnxruntime import OnnxStages
        from fusar_edge.model.rope import text_positions

        self.stages = OnnxStages(bundle / variant, device="cpu", threads=threads)
        self.positions = text_positions
        self.weight_bytes = sum(p.stat().st_size for p in self.stages.dir.glob("decoder.onnx*"))
        self.name = f"fusar-edge onnxruntime ({variant})"

    def run(self, prompt: list[int], new: int):
        st = self.stages
        t0 = time.perf_counter()
        embeds = st.embed(np.asarray(prompt, np.int64))
        logits, state = st.prefill(embeds, self.positions(0, len(prompt)))
        tok = int(np.argmax(logits))
        prefill = time.perf_counter() - t0
        toks, steps, pos = [tok], [], len(prompt)
        for _ in range(new - 1):
            t0 = time.perf_counter()
            logits, state = st.step(tok, pos, state)
            tok, pos = int(np.argmax(logits)), pos + 1
            steps.append(time.perf_counter() - t0)
            toks.append(tok)
        return prefill, steps, toks


class GenaiEngine:
    name = "onnxruntime-genai int4"

    def __init__(self, ckpt: Path, threads: int, work: Path, block: int = 128, spin: bool = False):
        import onnxruntime_genai as og

        out = work / "genai-int4"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(out),
               "-p", "int4", "-e", "cpu", "-c", str(work / "genai-cache"), "--extra_options",
               f"int4_block_size={block}", "int4_accuracy_level=4"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        cfg_path = out / "genai_config.json"
        cfg = json.loads(cfg_path.read_text())
        so = cfg["model"]["decoder"].setdefault("session_options", {})
        so["intra_op_num_threads"] = threads
        so["session.intra_op.allow_spinning"] = "1" if spin else "0"  # as our decoder's session
        cfg_path.write_text(json.dumps(cfg, indent=2))
        self.og, self.model = og, og.Model(str(out))
        self.weight_bytes = sum(p.stat().st_size for p in out.glob("model.onnx*"))
        self.name = f"onnxruntime-genai {og.__version__} int4 (block {block})"

    def run(self, prompt: list[int], new: int):
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray([prompt], np.int32))
        prefill = time.perf_counter() - t0  # append_tokens runs the prompt; its token is the next one out
        toks, steps = [int(gen.get_next_tokens()[0])], []
        for _ in range(new - 1):
            t0 = time.perf_counter()
            gen.generate_next_token()
            steps.append(time.perf_counter() - t0)
            toks.append(int(gen.get_next_tokens()[0]))
        return prefill, steps, toks


class LlamaCppEngine:
    name = "llama.cpp Q4_0"

    def __init__(self, ckpt: Path, threads: int, work: Path, llama_src: Path):
        import llama_cpp

        f32 = work / "model-f32.gguf"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(llama_src / "gguf-py"), str(llama_src)])}
        # The converter recognises a BPE pre-tokenizer by hashing its output on a test string; the
        # presets' small tokenizer is not in its table. Token ids are fed directly here, so its
        # name does not matter: "default".
        convert = ("import sys, conversion.base as b, convert_hf_to_gguf as c; "
                   "b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'default'; "
                   f"sys.argv = ['convert_hf_to_gguf.py', {str(ckpt)!r}, '--outfile', {str(f32)!r}, "
                   "'--outtype', 'f32']; c.main()")
        subprocess.run([sys.executable, "-c", convert], check=True, capture_output=True, text=True, env=env)
        q4 = work / "model-q4_0.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(q4).encode(), params) != 0:
            raise RuntimeError("llama_model_quantize failed")
        self.llm = llama_cpp.Llama(model_path=str(q4), n_threads=threads, n_threads_batch=threads, n_ctx=512,
                                   n_batch=512, verbose=False, logits_all=False)
        self.weight_bytes = q4.stat().st_size
        self.name = f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) Q4_0"

    def run(self, prompt: list[int], new: int):
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        prefill = time.perf_counter() - t0
        toks, steps = [tok], []
        for _ in range(new - 1):
            t0 = time.perf_counter()
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            steps.append(time.perf_counter() - t0)
            toks.append(tok)
        return prefill, steps, toks


# --- the run ---------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="`fusar-edge export PRESET --out DIR --gptq4` output")
    p.add_argument("--preset", default="small")
    p.add_argument("--like", help="instead of --preset: the model of benchmarks/scaled_decoder.py, layers shaped "
                                  "as this preset's (e.g. qwen2.5-vl-3b); give its --layers too")
    p.add_argument("--layers", type=int, default=4, help="with --like: how many layers (default 4)")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--prompt", type=int, default=141, help="prompt tokens (small: 64 image + 77 text in the issue)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gap", type=float, default=0.3, help="idle seconds before each engine's run (default 0.3)")
    p.add_argument("--llama-src", type=Path, help="llama.cpp source tree (convert_hf_to_gguf.py, gguf-py)")
    p.add_argument("--out", type=Path)
    a = p.parse_args()

    from fusar_edge.bench.bandwidth import read_ceiling_gbs, same_size_ceiling_gbs
    from fusar_edge.bench.machine import machine_info

    notes, engines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = work / "hf"
        if a.like:
            from scaled_decoder import scaled_config  # benchmarks/, beside this script

            config = scaled_config(a.like, a.layers)
        else:
            from fusar_edge.config import preset as get_preset

            config = get_preset(a.preset)
        info = save_text_checkpoint(config, a.bundle / "tokenizer.json", ckpt)
        engines.append(TransformersEngine(ckpt, a.threads))
        ours = FusarOrtEngine(a.bundle, a.threads)
        engines.append(ours)
        if importlib.util.find_spec("onnxruntime_genai"):
            try:
                engines.append(GenaiEngine(ckpt, a.threads, work, spin=ours.stages.decoder_spins))
            except subprocess.CalledProcessError as exc:
                notes.append(f"onnxruntime-genai skipped: its builder failed ({exc.stderr.strip().splitlines()[-1]})")
        else:
            notes.append("onnxruntime-genai skipped: not installed (pip install onnxruntime-genai)")
        if importlib.util.find_spec("llama_cpp") and a.llama_src:
            try:
                engines.append(LlamaCppEngine(ckpt, a.threads, work, a.llama_src))
            except (subprocess.CalledProcessError, RuntimeError) as exc:
                detail = exc.stderr.strip().splitlines()[-1] if hasattr(exc, "stderr") and exc.stderr else str(exc)
                notes.append(f"llama.cpp skipped: {detail}")
        else:
            notes.append("llama.cpp skipped: needs llama-cpp-python installed and --llama-src "
                         "(its vendor/llama.cpp tree, for convert_hf_to_gguf.py)")

        rng = np.random.default_rng(0)
        prompt = [int(x) for x in rng.integers(0, info["vocab"], a.prompt)]
        for e in engines:  # warm-up: first-call allocations, thread pools
            e.run(prompt, 4)
        prefill = {e.name: [] for e in engines}
        decode = {e.name: [] for e in engines}
        tokens = {}
        for r in range(a.rounds):
            for e in engines:
                # an idle gap first: worker pools that spin after a run (OpenMP, ONNX Runtime's
                # decoder) must not take the CPU from the engine after them
                time.sleep(a.gap)
                pf, steps, toks = e.run(prompt, a.new_tokens)
                prefill[e.name].append(pf)
                decode[e.name].append(statistics.median(steps))
                tokens[e.name] = toks
            print(f"\rround {r + 1}/{a.rounds}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        ceiling = read_ceiling_gbs()
        rows = []
        for e in engines:
            step = statistics.median(decode[e.name])
            # against a read of the engine's own weight bytes too: weights that fit the CPU's
            # cache (small's ~50 MB on a large-L3 Xeon) read faster than memory's ceiling
            same = same_size_ceiling_gbs(e.weight_bytes, memory_gbs=ceiling)
            rows.append({"engine": e.name, "decode_tok_s": round(1 / step, 1),
                         "prefill_ms": round(statistics.median(prefill[e.name]) * 1e3, 1),
                         "weights_read_mb_per_token": round(e.weight_bytes / 1e6, 1),
                         "read_gb_s": round(e.weight_bytes / step / 1e9, 2),
                         "of_ceiling": round(e.weight_bytes / step / 1e9 / ceiling, 3),
                         "same_size_read_gb_s": same,
                         "of_same_size_ceiling": round(e.weight_bytes / step / 1e9 / same, 3)})
        base = rows[0]["decode_tok_s"]
        for row in rows:
            row["decode_vs_baseline"] = round(row["decode_tok_s"] / base, 2)
        same = {k: v == tokens[engines[0].name] for k, v in tokens.items()}
        result = {"preset": config.name, "prompt_tokens": a.prompt, "new_tokens": a.new_tokens, "threads": a.threads,
                  "onnxruntime_decoder_spins": ours.stages.decoder_spins, "gap_s": a.gap,
                  "rounds": a.rounds, "read_ceiling_gb_s": round(ceiling, 2), "machine": machine_info(),
                  "load_avg_1m_at_end": os.getloadavg()[0], "engines": rows, "notes": notes,
                  "greedy_tokens_equal_to_baseline": same,
                  "command": "python benchmarks/peers.py " + " ".join(sys.argv[1:])}
    out = a.out or ROOT / "benchmarks" / "results" / f"peers-{config.name}-{socket.gethostname().split('.')[0]}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| engine | decode tok/s | x baseline | prefill {a.prompt} tok ms | weights read / token MB | "
          f"read GB/s | of ceiling | of a same-size read |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['engine']} | {r['decode_tok_s']} | {r['decode_vs_baseline']} | {r['prefill_ms']} | "
              f"{r['weights_read_mb_per_token']} | {r['read_gb_s']} | {r['of_ceiling']:.0%} | "
              f"{r['of_same_size_ceiling']:.0%} ({r['same_size_read_gb_s']} GB/s) |")
    print(f"read ceiling {ceiling:.1f} GB/s; notes: {'; '.join(notes) or 'none'}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
