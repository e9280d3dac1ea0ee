"""Quantization passes: dynamic int8, static int8 (QDQ), int4/int8 weight-only; see base.py."""
