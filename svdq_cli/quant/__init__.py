"""Pure quantization math on tensors: number formats, packing, smoothing, low rank, GPTQ, SVDQuant of one
layer group, vector quantization and input statistics. Nothing here touches files, CLIs or diffusers, and it
imports nothing of svdq but the thread policy in system/ (its numerics must not depend on the thread count).
"""
