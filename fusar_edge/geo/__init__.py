"""Geospatial inputs: SAR images (``sar``) and spatiotemporal AEF anchors (``anchors``)."""

from .anchors import Anchor, AnchorSet
from .chip import to_chip
from .sar import SarImage, parse_date, read_sar

__all__ = ["SarImage", "read_sar", "to_chip", "parse_date", "Anchor", "AnchorSet"]
