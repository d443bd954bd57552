"""Tensor and metadata key names of a quantized layer, in one place so writers and readers cannot drift."""

QWEIGHT = "qweight"  # packed 4-bit codes [N, K/2] uint8 (int8 [N, K] for the int8 format)
WSCALES = "wscales"  # per-group weight scales [N, K/group]
WTSCALE = "wtscale"  # NVFP4 per-tensor float32 scale (0-d)
SMOOTH = "smooth"  # λ [K]: the layer divides its input by it
SHIFT = "shift"  # float32 0-d: added to the input before smoothing (unsigned activations)
LORA_DOWN = "lora_down"  # [r, K], acts on the smoothed input
LORA_UP = "lora_up"  # [N, r]
BIAS = "bias"  # [N]

TENSORS = (QWEIGHT, WSCALES, WTSCALE, SMOOTH, SHIFT, LORA_DOWN, LORA_UP, BIAS)

# Per-layer metadata (strings, as safetensors metadata requires).
META_PRECISION = "precision"
META_ACT = "act"
META_IN = "in_features"
META_OUT = "out_features"
META_DTYPE = "dtype"
META_ACT_RANGE = "act_range"  # "full": signed activation groups reach code −8; absent or "symmetric": max|x|/7
