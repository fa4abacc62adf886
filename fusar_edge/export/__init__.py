"""Export pipeline (installed as ``fusar_edge.export``).

- ``onnx_stages``: the model's stages as ONNX graphs (vision, embed, fusion, decoder with KV
  cache) and the parity report against the torch model
- ``gptq`` / ``gptq_format``: GPTQ and round-to-nearest 4-bit quantisation of any causal LM's
  linear layers; Hugging Face GPTQ checkpoints (both zero-point storages)
- ``int4_onnx`` / ``int4_fuse``: 4-bit weights packed into ONNX as ``MatMulNBits`` (ONNX Runtime)
- ``edgellm`` (+ ``edgellm_graphs``, ``edgellm_llm``): the bundle for TensorRT Edge-LLM on a
  Jetson: its GPTQ checkpoint, its exporter's graph, our fp16 vision / GRASP graphs, the join
- ``bundle_export``: ``fusar-edge export``, which writes all of these into a new bundle
"""
