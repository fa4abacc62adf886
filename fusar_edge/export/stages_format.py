"""The ONNX export's layout: file names and ``stages.json``, readable without torch.

``onnx_stages`` writes exports (and needs torch); the ONNX Runtime backend only reads them,
so what both need to agree on lives here.
"""

from __future__ import annotations

from pathlib import Path

from fusar_edge.errors import BundleError
from fusar_edge.fsutil import read_json

FORMAT = "fusar-edge-onnx-v2"  # v2: decoder.onnx with ONNX Runtime's fused ops and an in-place KV cache
STAGES_JSON = "stages.json"
STAGE_FILES = {"vision": "vision.onnx", "embed": "embed.onnx", "fusion": "fusion.onnx", "decoder": "decoder.onnx"}


def read_stages(onnx_dir: str | Path) -> dict:
    """``stages.json`` of an export, with a clear error when it is missing."""
    path = Path(onnx_dir) / STAGES_JSON
    missing = "not an ONNX export: run `fusar-edge export BUNDLE --out DIR --onnx`"
    if not path.is_file():
        raise BundleError(f"{path}: missing ({missing})")
    data = read_json(path, missing)
    if data.get("format") != FORMAT:
        raise BundleError(f"{path}: format: expected {FORMAT!r}, got {data.get('format')!r} (an export by an "
                          "older fusar-edge: export the bundle again)")
    return data
