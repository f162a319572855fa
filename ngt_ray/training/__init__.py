"""Fitting and shrinking models: labelled photos, cached embeddings, group fine-tuning, pruning, EASIER, acceptance."""
