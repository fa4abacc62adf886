"""Training: the seeds' two-stage SFT (plus a stage 0 for models trained from scratch)."""
