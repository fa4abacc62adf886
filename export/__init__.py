"""Export pipeline: ONNX stages, GPTQ 4-bit, TensorRT (installed as ``fusar_edge.export``).

Not implemented yet (issue 5). The model already exposes its three stages
(``FusarModel.vision`` / ``.fusion`` / ``.decoder``) as the unit of export.
"""
