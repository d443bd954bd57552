"""The ``svdq`` command line: one module per command; ``main`` assembles them and maps errors to exit codes.

Commands only parse, build a RunConfig, call the stages or ship/ and render. They import the rest of svdq inside
their bodies, so that ``svdq --help`` does not load torch and diffusers. May import every package.
"""
