"""``svdq eval``: the SVDQuant paper's quality protocol (Table 1) — benchmarks with real images, generated images
kept per method, prompt and seed, metrics from the field's libraries, and the report (DESIGN.md §5)."""
