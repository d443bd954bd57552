"""Files svdq writes for others to load: the single-file svdq export (``svdq_file``) and other engines'
checkpoints (``nunchaku/``). May import engines/ and everything below it.
"""
