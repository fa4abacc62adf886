"""Synthetic SAR training data with ground truth, in the FUSAR-GPT reference manifest format."""
