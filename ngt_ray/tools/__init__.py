"""Offline commands: train, calibrate, compress, evaluate, benchmark, demo."""
