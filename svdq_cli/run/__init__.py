"""A run directory and what it is made from: the recipe (``recipe``: a typed, validated RunConfig), the
directory with its manifest and lock (``directory``), run-local caches (``cache``) and the validation gates
(``gates``). May import formats/ and everything below it; never stages/.
"""
