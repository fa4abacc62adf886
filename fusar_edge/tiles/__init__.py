"""The AEF tile store: AlphaEarth Foundations embeddings on local disk, looked up per image.

One job per module (docs/tilestore.md is the normative format):

- ``format``: the on-disk layout (index.bin, manifest.json, generations, ``CURRENT``) and the
  atomic commit every writer goes through.
- ``store``: ``TileStore``, lookups in numpy (the reference), handed to the C reader when built.
- ``native``: ctypes binding of ``libfusar_tiles`` (``native/tiles``), the C reader.
- ``years``: which AEF year an acquisition date asks for (shared by both readers).
- ``utm``: the lon/lat -> UTM projection both readers evaluate the same way.
- ``verify``: re-hash a store against its own checksums (``fusar-edge tiles verify``).
- ``ingest``: ``ingest(sources, store, ...)``, the entry point of ``fusar-edge tiles ingest``; its
  sources are ``ingest_cog`` (official AEF COGs), ``ingest_index`` (the published aef_index
  naming local COGs) and ``ingest_zarr`` (aef-download zarr stores), its shared planning is
  ``ingest_plan`` and its crash safety (lock, journal, streamed tile writes, one commit)
  ``ingest_commit``.

Imports run one way, with no cycle and no import inside a function between them:
``store`` -> ``native`` -> ``years``, ``format``; ``ingest`` -> ``ingest_cog`` / ``_index`` /
``_zarr`` / ``_commit`` -> ``ingest_plan`` -> ``format`` -> ``utm``; ``verify`` -> ``format``.
Nothing is imported here, so ``fusar_edge.tiles.ingest`` stays the module (not the function)
and importing one part does not load the others.
"""
