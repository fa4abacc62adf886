"""fusar-edge: edge inference for SAR vision-language models.

The Python API ground-station software embeds::

    from fusar_edge import Runtime, AnchorSet
    rt = Runtime.open("bundles/fusar-7b")          # or Runtime.open() for the built-in trained demo
    ans = rt.ask("scene.tif", "How many ships are there in this image?", anchors="anchors.npz")
    ans.answer, ans.text, ans.timings_ms
"""

__version__ = "0.1.0"

from .errors import (AnchorError, BundleError, CoverageError, FusarError, InputError,  # noqa: E402
                     MissingAnchorsError)

_LAZY = {
    "Runtime": ("runtime", "Runtime"),
    "Answer": ("runtime", "Answer"),
    "Anchor": ("geo.anchors", "Anchor"),
    "AnchorSet": ("geo.anchors", "AnchorSet"),
    "TileStore": ("tiles.store", "TileStore"),
    "FusarConfig": ("config", "FusarConfig"),
    "StoreError": ("tiles.format", "StoreError"),
}


def __getattr__(name):
    # Lazy so `fusar-edge --help` and light imports do not pay for torch/transformers.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():  # tab completion shows the lazy names too
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["Runtime", "Answer", "Anchor", "AnchorSet", "TileStore", "FusarConfig", "FusarError", "InputError",
           "AnchorError", "BundleError", "CoverageError", "MissingAnchorsError", "StoreError", "__version__"]
