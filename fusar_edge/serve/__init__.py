"""``fusar-edge serve``: the runtime over HTTP (FastAPI + uvicorn)."""
