"""Optimization passes, registered by name through the graphopt.passes entry points."""
