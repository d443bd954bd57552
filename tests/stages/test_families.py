"""End to end on every tiny family: quantize → validate → export → load → generate."""

import json

import pytest
import torch

from svdq_cli.formats.svdq_file import load_quantized_pipeline
from svdq_cli.models.registry import ADAPTERS
from svdq_cli.runtime.linear import SVDQLinear
from tests.conftest import svdq

RECIPE = """
model: {family}
family: {family}
dtype: float32
quant: {{rank: 16, calib_rows: 128, search_rows: 64}}
calibration: {{num_prompts: 2, steps: 2, resolution: 64}}
validation: {{num_prompts: 1, steps: 2, resolution: 64, baselines: [rtn]}}
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", ["tiny-pixart", "tiny-sana", "tiny-sd3"])
def test_family_end_to_end(family, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(family=family))
    code, stdout, stderr = svdq("quantize", family, "--recipe", recipe, "--out", tmp_path / "run", "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    report = json.loads((tmp_path / "run" / "validate" / "report.json").read_text())
    assert report["methods"]["svdquant"]["latent_error"] < report["methods"]["rtn"]["latent_error"]
    pipeline = load_quantized_pipeline(result["export"])
    adapter = ADAPTERS[family]
    expected = len(adapter.discover(adapter.build_tiny(0)).targets)
    assert sum(isinstance(m, SVDQLinear) for m in pipeline.transformer.modules()) == expected
    images = adapter.generate(pipeline, report["prompts"], report["seeds"], 2, adapter.protocol.guidance, 64)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
