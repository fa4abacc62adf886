"""``fusar-edge bench``: per-stage latency of every backend, beside a plain transformers baseline.

- ``machine``: what the numbers were measured on (CPU, GPU, versions, commit);
- ``clock``: stage timing (back-to-back marks, device-synchronised) and peak memory;
- ``stats``: percentiles of the samples;
- ``runner``: one request through a backend's stages, repeated; the transformers baseline;
- ``report``: the terminal table, the JSON document and the PNG plot.
"""
