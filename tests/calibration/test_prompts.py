import json

import pytest

from svdq_cli.calibration.prompts import load_prompts, prompt_seed
from svdq_cli.errors import BadInputError


def test_builtin_sets_are_large_diverse_and_disjoint():
    calibration = load_prompts("builtin:calibration")
    validation = load_prompts("builtin:validation")
    assert len(calibration) >= 256 and len(set(calibration)) == len(calibration)
    assert not set(calibration) & set(validation)
    assert sum('"' in p for p in calibration) >= 32  # text rendering
    assert load_prompts("builtin:calibration", 5) == calibration[:5]


def test_text_json_and_csv_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog \n")
    (tmp_path / "p.json").write_text(json.dumps(["a cat", {"prompt": "a dog"}]))
    (tmp_path / "p.csv").write_text('prompt,id\n"a cat, sleeping",1\na dog,2\n')
    assert load_prompts(str(tmp_path / "p.txt")) == ["a cat", "a dog"]
    assert load_prompts(str(tmp_path / "p.json")) == ["a cat", "a dog"]
    assert load_prompts(str(tmp_path / "p.csv")) == ["a cat, sleeping", "a dog"]


def test_bad_sources(tmp_path, monkeypatch):
    with pytest.raises(BadInputError, match="unknown prompt set"):
        load_prompts("builtin:nope")
    with pytest.raises(BadInputError, match="at least 1"):
        load_prompts("builtin:calibration", 0)
    monkeypatch.setattr("svdq_cli.system.online.hub_reachable", lambda: False)
    with pytest.raises(BadInputError, match="cannot reach the Hugging Face Hub to load dataset 'org/name'"):
        load_prompts("hf:org/name:train:text")
    monkeypatch.setattr("svdq_cli.system.online.hub_reachable", lambda: True)  # reachable, but the dataset fails
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(BadInputError, match="could not load dataset 'org/name'"):
        load_prompts("hf:org/name:train:text")


def test_prompt_seeds_are_stable_and_distinct():
    assert prompt_seed("a cat", 0) == prompt_seed("a cat", 0)
    assert prompt_seed("a cat", 0) != prompt_seed("a cat", 1) != prompt_seed("a dog", 0)
