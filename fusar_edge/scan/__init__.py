"""Whole-scene scanning: chip grid, pixel -> map coordinates, merging detections across chip overlaps."""
