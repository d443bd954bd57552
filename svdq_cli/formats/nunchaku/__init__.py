"""``svdq export RUN --format nunchaku``: an svdq Flux export rewritten as the checkpoint Nunchaku loads.

``layout`` packs tensors into Nunchaku's fragment orders (pure tensor code), ``flux`` maps, fuses and splits the
Flux layers, ``export`` reads the run's verified export and records the result as an export artifact.
"""
