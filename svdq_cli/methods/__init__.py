"""Quantization methods as data: one module per method (svdquant, smoothquant, rtn, vq4dit, kmeans), each
defining a :class:`~svdq_cli.methods.base.Method`; ``registry`` lists them, ``config`` holds the QuantConfig
that names one, ``baselines`` the configs a run is measured against. A new method is one module here and one
line in ``registry`` (and an engine in engines/ if none of the two fits). May import quant/ and system/.
"""
