"""The CUDA-on-CPU emulator: the real ``kernels/*.cu`` translated (``translate``), compiled as host C++ and run
with one fiber per CUDA thread (``backend``). A runtime users can select, not only test support.
"""
