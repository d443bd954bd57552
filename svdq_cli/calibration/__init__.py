"""What calibration runs on and records: prompt sets (``prompts``), statistics of every layer input through
hooks (``collector``) and sampled block calls for block-wise calibration (``block_inputs``). May import
runtime/ and everything below it.
"""
