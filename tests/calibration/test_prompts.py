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


def test_editing_prompts_carry_their_reference_image(tmp_path):
    from PIL import Image

    from svdq_cli.calibration.prompts import Prompt, identity

    (tmp_path / "images").mkdir()
    for name, color in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (40, 24), color).save(tmp_path / "images" / name)
    (tmp_path / "p.json").write_text(json.dumps([{"prompt": "make it night", "image": "images/a.png"},
                                                 {"prompt": "make it night", "image": "images/b.png"}, "a dog"]))
    (tmp_path / "p.csv").write_text("prompt,image\nmake it night,images/a.png\na dog,\n")
    night_a, night_b, dog = load_prompts(str(tmp_path / "p.json"))
    assert isinstance(night_a, Prompt) and night_a == "make it night" and not isinstance(dog, Prompt)
    assert night_a.image == str(tmp_path / "images" / "a.png")  # relative to the prompt file, made absolute
    assert identity(night_a) != identity(night_b) and identity(dog) == "a dog"  # one text, two edits
    assert night_a.reference_image(24, 16).size == (24, 16)  # width, height
    assert night_a.reference_image(16, 16).getpixel((3, 3)) == (255, 0, 0)
    from_csv = load_prompts(str(tmp_path / "p.csv"))
    assert identity(from_csv[0]) == identity(night_a) and from_csv[1] == "a dog"
    (tmp_path / "bad.json").write_text(json.dumps([{"prompt": "x", "image": "images/missing.png"}]))
    with pytest.raises(BadInputError, match="reference image .*missing.png cannot be read"):
        load_prompts(str(tmp_path / "bad.json"))
    (tmp_path / "images" / "text.png").write_text("not an image")
    (tmp_path / "bad.json").write_text(json.dumps([{"prompt": "x", "image": "images/text.png"}]))
    with pytest.raises(BadInputError, match="is not an image PIL can read"):
        load_prompts(str(tmp_path / "bad.json"))
