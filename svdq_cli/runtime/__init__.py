"""Run-time layers: SVDQLinear and VQLinear with their reference forward, the fused CUDA path (``kernels``, its
fragment layouts and cost model), the CPU emulator that runs the same kernels (``emulator/``) and the tensor
key names (``keys``). May import methods/, quant/ and system/.
"""
