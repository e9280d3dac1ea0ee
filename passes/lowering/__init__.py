"""Per-backend lowerings: rewrites of fused forms into what one execution provider runs best,
run by a backend after fusion and quantization (e.g. ``lower-ort-cpu``)."""
