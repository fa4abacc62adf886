"""Runtime backends other than torch eager (ONNX Runtime over the exported stages)."""
