"""Property tests: any recipe and any prompt file either loads or raises svdq's one-line BadInputError —
never another exception (which the CLI would report as "unexpected")."""

import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from svdq_cli.calibration.prompts import load_prompts
from svdq_cli.errors import BadInputError
from svdq_cli.run.recipe import RunConfig, load_recipe

KEYS = ["model", "family", "dtype", "device", "offload", "quant", "calibration", "validation", "recipe", "version",
        "method", "precision", "rank", "alphas", "gptq", "num_prompts", "steps", "resolution", "prompts", "seed",
        "min_psnr", "baselines", "runtime", "weight_only", "group_size", "calib_rows", "scale_dtype"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(string.printable, max_size=12), st.sampled_from(["tiny-flux", "int4", "svdquant", "cpu"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS) | st.integers(0, 3), inner, max_size=5)),
    max_leaves=12)
documents = st.one_of(
    st.dictionaries(st.sampled_from(KEYS) | st.text(string.ascii_letters, max_size=8) | st.integers(), values,
                    max_size=8),
    values,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=documents, raw=st.booleans(), text=st.text(max_size=80))
def test_any_recipe_loads_or_is_one_bad_input_error(tmp_path, document, raw, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text if raw else yaml.safe_dump(document))
    try:
        config = load_recipe(str(path))
    except BadInputError as error:
        assert "\n" not in str(error)
    else:
        assert isinstance(config, RunConfig)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
       suffix=st.sampled_from([".txt", ".json", ".csv", ".prompts"]))
def test_any_prompt_file_loads_or_is_one_bad_input_error(tmp_path, data, suffix):
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(data)
    try:
        prompts = load_prompts(str(path))
    except BadInputError as error:
        assert "\n" not in str(error)
    else:
        assert prompts and all(isinstance(p, str) and p and p == p.strip() for p in prompts)


def test_the_activation_rule_is_validated_and_leaves_older_runs_hashes_alone():
    from svdq_cli.methods.config import QuantConfig
    from svdq_cli.stages import quantize, smooth, svd

    assert QuantConfig().activation_rule == "full" and QuantConfig(version=1).activation_rule == "symmetric"
    assert QuantConfig(act_range="nunchaku").activation_rule == "nunchaku"
    try:
        QuantConfig(act_range="wide")
    except ValueError as error:
        assert "act_range" in str(error) and "nunchaku" in str(error)
    else:
        raise AssertionError("an unknown act_range was accepted")
    default = load_recipe("tiny-flux", {})
    chosen = load_recipe("tiny-flux", {"quant.act_range": "nunchaku"})
    for stage in (smooth, svd, quantize):
        assert "act_range" not in stage.reads(default)  # hashes of runs made before the field existed
        assert stage.reads(chosen)["act_range"] == "nunchaku"
