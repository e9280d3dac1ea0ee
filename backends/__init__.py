"""Targets (ONNX Runtime execution providers), registered through the graphopt.backends entry points."""
