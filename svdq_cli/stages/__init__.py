"""The pipeline: one module per stage (collect, smooth, svd, quantize, validate, export), the shared ``base``,
the ``workspace`` the stages of one process share and the ``runner`` that runs, resumes or skips them.
May import run/, formats/, engines/, models/, calibration/ and everything below them; never ship/ or cli/.
"""
