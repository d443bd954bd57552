"""Models: what to quantize, found in the model (``discovery``) and planned per layer (``targets``); one
preset adapter module per family (its pipeline and protocol), listed in ``registry``, and the generic adapter
read from any other pipeline (``generic``); loading a pipeline
(``loading``), block streaming (``streaming``), text encodings replayed (``text_first``), the built-in tiny
models (``tiny``) and synthetic data (``synthetic``, ``shaped``). The one package that knows diffusers
pipelines. May import calibration/ and everything below it.
"""
