"""TensorRT Edge-LLM's own exporter over our checkpoint: ``edgellm/llm/`` (ONNX with its plugins).

Edge-LLM's exporter (``tensorrt-edgellm``, pinned to ``EDGELLM_VERSION`` by the ``edgellm``
extra) turns a Hugging Face GPTQ checkpoint into an ONNX graph of its plugins: one
``Int4GroupwiseGemmPluginV2`` per quantised linear, one ``AttentionPlugin`` per layer (paged
KV cache, host-given rotary cos/sin), ``inputs_embeds`` in, logits out. ``llm_build`` on the
target turns that into an engine. We run it with ``--skip-visual`` (our vision stage carries
TLM, which its Qwen2.5-VL encoder has not) and with the last layer's hidden states as an extra
output, ``hidden_states``: GRASP's question vector comes from a text-only pass of the same
engine, so the target needs no second copy of the language model.

The exporter has no flag for that output; it is its documented extension point instead:
a ``CausalLM`` subclass with ``emit_hidden_states = True``, registered for the checkpoint's
text ``model_type`` (``register_model``, public API). That registration must happen in the
process that runs the exporter, so it runs in a child process (``python -m`` this module),
which also keeps its torch tracing, logging and memory out of ours.

Run by hand (e.g. on an x86 host with the extra installed, after an export made without it)::

    python -m fusar_edge.export.edgellm_llm BUNDLE

writes ``BUNDLE/edgellm/llm/`` from ``BUNDLE/edgellm/checkpoint/`` and refreshes
``fusar_edgellm.json`` and ``manifest.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

EDGELLM_VERSION = "0.11.0"  # the version this export was checked against (pyproject's `edgellm` extra)
DISTRIBUTION = "tensorrt-edgellm"
INT4_GEMM = "Int4GroupwiseGemmPluginV2"
ATTENTION = "AttentionPlugin"
LOG = "edgellm-export.log"


def installed_version() -> str | None:
    """The installed ``tensorrt-edgellm`` version, or None (read from its metadata: no import)."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def command(bundle: str | Path) -> str:
    """The command that writes ``llm/`` later, for a bundle exported without Edge-LLM installed."""
    return (f"pip install 'fusar-edge[torch,edgellm]'  (or: pip install {DISTRIBUTION}=={EDGELLM_VERSION}), "
            f"then: python -m fusar_edge.export.edgellm_llm {bundle}")


def run_exporter(checkpoint: Path, llm_dir: Path) -> dict:
    """Edge-LLM's exporter on ``checkpoint`` in a child process -> ``llm_dir``; -> what it wrote.

    Raises ``FusarError`` with the end of its log when it fails; the log stays in ``llm_dir``
    either way (``edgellm-export.log``).
    """
    from fusar_edge.errors import FusarError

    for stale in llm_dir.parent.glob(f".{llm_dir.name}.edgellm-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    scratch = llm_dir.with_name(f".{llm_dir.name}.edgellm-{os.getpid()}")
    scratch.mkdir(parents=True)
    log = scratch / LOG
    t0 = time.perf_counter()
    try:
        with open(log, "w", encoding="utf-8") as f:
            proc = subprocess.run([sys.executable, "-m", __name__, "--child", str(checkpoint), str(scratch)],
                                  stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        produced = scratch / "llm"
        if proc.returncode != 0 or not (produced / "model.onnx").is_file():
            tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-6:]
            raise FusarError(f"TensorRT Edge-LLM's exporter failed on {checkpoint} (exit {proc.returncode}): "
                             + " | ".join(tail))
        shutil.move(str(log), produced / LOG)
        shutil.rmtree(llm_dir, ignore_errors=True)
        os.replace(produced, llm_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    graph = inspect_graph(llm_dir / "model.onnx")
    return {"dir": llm_dir.name, "edgellm_version": installed_version(), "seconds": round(time.perf_counter() - t0, 1),
            "graph": graph}


def inspect_graph(path: Path) -> dict:
    """Plugin node counts and outputs of Edge-LLM's ``model.onnx`` (weights not loaded)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx"))
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    return {"plugins": dict(sorted(ops.items())), "outputs": list(outputs),
            "hidden_states": outputs.get("hidden_states"), "inputs": [i.name for i in model.graph.input]}


def check_graph(graph: dict, quantized: int, layers: int) -> list[str]:
    """What is wrong with Edge-LLM's graph for our runner ([] = nothing): one INT4 GEMM plugin per
    quantised linear (a linear it kept in fp16 would be 4x the memory), one attention plugin per
    layer, and the ``hidden_states`` output GRASP needs."""
    plugins = graph["plugins"]
    problems = []
    if plugins.get(INT4_GEMM, 0) != quantized:
        problems.append(f"{plugins.get(INT4_GEMM, 0)} {INT4_GEMM} nodes for {quantized} quantised linears")
    if plugins.get(ATTENTION, 0) != layers:
        problems.append(f"{plugins.get(ATTENTION, 0)} {ATTENTION} nodes for {layers} layers")
    if graph["hidden_states"] is None:
        problems.append("no hidden_states output (GRASP's question pass needs it)")
    return problems


def _initializer(tensor, folder: Path):
    """An initializer's values as numpy, reading only its own bytes of external data (a 7B
    graph's weights are gigabytes; one linear's are a few megabytes)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    raw = np.fromfile(folder / info["location"], dtype=np.uint8, count=int(info["length"]),
                      offset=int(info.get("offset", 0)))
    return raw.view(dtype).reshape(tuple(tensor.dims))


FULL_CHECK_CODES = 1 << 28  # above this many 4-bit codes only the first and last layer's are repacked (~15 s per 1e8)


def check_weights(llm_dir: Path, weights: dict) -> dict:
    """Edge-LLM's INT4 weights in its graph vs ours, linear by linear.

    For each ``Int4GroupwiseGemmPluginV2`` node: its packed weights must equal Edge-LLM's own
    fragment packing (``repack_to_cutedsl_fragment``) of our unsigned codes ``q + 8`` laid out
    ``[N, K]``, its scales ``[K / 128, N]`` our scales, and the activation permutation before it
    (``desc_act``) the identity. This checks what its loader made of our checkpoint (zero-point
    convention, transposes, group order) with its layout function as the oracle for the layout;
    whether its kernel reads that layout right is its own business, checked on a GPU only.
    Repacking in numpy costs ~15 s per 1e8 codes, so a model above ``FULL_CHECK_CODES`` (7B: 6.5e9)
    has its packed weights compared for the first and last layer (every projection kind); scales
    and permutations are compared for every linear.
    """
    import numpy as np
    import onnx
    import torch
    from tensorrt_edgellm.checkpoint.repacking import repack_to_cutedsl_fragment

    graph = onnx.load(str(llm_dir / "model.onnx"), load_external_data=False).graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    by_tail = {name[name.index("layers."):]: w for name, w in weights.items() if "layers." in name}
    problems, checked, packed = [], 0, 0
    layers = sorted({int(t.split(".")[1]) for t in by_tail if t.split(".")[1].isdigit()})
    sample = None
    if sum(w.q.numel() for w in weights.values()) > FULL_CHECK_CODES and layers:
        sample = {f"layers.{layers[0]}.", f"layers.{layers[-1]}."}
    for node in graph.node:
        if node.op_type != INT4_GEMM:
            continue
        qname = node.input[1]
        tail = qname[qname.index("layers."):-len(".qweight")] if "layers." in qname else qname
        w = by_tail.get(tail)
        if w is None:
            problems.append(f"{qname}: no quantised linear of ours ends in {tail!r}")
            continue
        if sample is None or any(tail.startswith(p) for p in sample):
            codes = (w.q.to(torch.int16) + 8).numpy()  # [N, K]
            if not np.array_equal(_initializer(inits[qname], llm_dir), repack_to_cutedsl_fragment(codes)):
                problems.append(f"{tail}: packed INT4 weights differ from our codes")
            packed += 1
        scales = _initializer(inits[node.input[2]], llm_dir)
        if not np.array_equal(scales, w.scales.t().to(torch.float16).numpy()):
            problems.append(f"{tail}: scales differ from ours")
        gather = producers.get(node.input[0])
        if gather is not None and gather.op_type == "Gather" and gather.input[1] in inits:
            perm = _initializer(inits[gather.input[1]], llm_dir)
            if not np.array_equal(perm, np.arange(perm.size)):
                problems.append(f"{tail}: activations permuted (act-order), ours are in order")
        checked += 1
    if checked != len(weights):
        problems.append(f"{checked} INT4 GEMM nodes checked for {len(weights)} quantised linears")
    return {"what": "Edge-LLM's packed INT4 weights and scales vs our GPTQ codes, per linear (its layout "
                    "function as the oracle)", "linears": checked, "packed_weights_compared": packed,
            "problems": problems, "ok": not problems}


def _child(checkpoint: str, out_dir: str) -> int:
    """In the child: register the hidden-states variant for the checkpoint's type, run the exporter."""
    from tensorrt_edgellm import model as edgellm_model
    from tensorrt_edgellm.models.default.modeling_default import CausalLM
    from tensorrt_edgellm.scripts import export as edgellm_export

    model_type = edgellm_model.load_model_config(checkpoint).model_type

    class HiddenStatesCausalLM(CausalLM):
        emit_hidden_states = True  # last layer, before the final norm (grasp.onnx applies the norm)

    edgellm_model.register_model(model_type, HiddenStatesCausalLM, edgellm_model.standard_attention_scale)
    print(f"fusar-edge: {model_type} registered with emit_hidden_states", flush=True)
    sys.argv = ["tensorrt-edgellm-export", checkpoint, out_dir, "--skip-visual"]
    edgellm_export.main()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"] and len(argv) == 3:
        return _child(argv[1], argv[2])
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m fusar_edge.export.edgellm_llm BUNDLE\n"
              "  writes BUNDLE/edgellm/llm/ with TensorRT Edge-LLM's exporter (pip install "
              f"{DISTRIBUTION}=={EDGELLM_VERSION})", file=sys.stderr)
        return 2
    from fusar_edge.errors import FusarError

    try:
        add_llm(Path(argv[0]))
    except FusarError as exc:
        print(f"fusar-edge: error: {exc}", file=sys.stderr)
        return 2
    return 0


def add_llm(bundle: Path) -> dict:
    """``llm/`` for an export written without Edge-LLM installed; refreshes the manifests."""
    from fusar_edge.errors import BundleError, FusarError
    from fusar_edge.fsutil import read_json, write_text_atomic
    from fusar_edge.model.bundle import MANIFEST, write_manifest

    from .edgellm import MANIFEST_NAME

    root = bundle / "edgellm"
    path = root / MANIFEST_NAME
    spec = read_json(path, "not an Edge-LLM export: run `fusar-edge export BUNDLE --out DIR --edgellm`")
    if installed_version() is None:
        raise FusarError(f"{DISTRIBUTION} is not installed: pip install {DISTRIBUTION}=={EDGELLM_VERSION}")
    from .gptq_format import load_gptq_checkpoint

    checkpoint = root / spec["checkpoint"]["dir"]
    llm = run_exporter(checkpoint, root / "llm")
    problems = check_graph(llm["graph"], spec["checkpoint"]["quantized_linears"], spec["llm_config"]["layers"])
    llm["weights_check"] = check_weights(root / "llm", load_gptq_checkpoint(checkpoint))
    problems += llm["weights_check"]["problems"]
    llm["problems"] = problems
    if problems:
        raise BundleError(f"{root / 'llm' / 'model.onnx'}: " + "; ".join(problems[:5]))
    spec["llm"] = llm
    write_text_atomic(path, json.dumps(spec, indent=2) + "\n")
    if (bundle / MANIFEST).is_file():
        write_manifest(bundle)
    print(f"wrote {root / 'llm'}: {llm['graph']['plugins']} in {llm['seconds']} s")
    return llm


if __name__ == "__main__":
    sys.exit(main())
