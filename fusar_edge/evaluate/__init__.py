"""Evaluation: prediction rows in the reference's ``infer_val.py`` format, and the paper's metrics."""
