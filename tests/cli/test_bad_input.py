"""Every bad input is one line on stderr, a documented exit code, no traceback, and no artifact lost."""

import fcntl
import json

import pytest

from tests.conftest import svdq


def one_line_error(stderr: str) -> str:
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("Error: ") and "Traceback" not in stderr, stderr
    return last


@pytest.mark.parametrize("args,code,message", [
    (["quantize", "no-such-model"], 2, "unknown model 'no-such-model'"),
    (["quantize", "tiny-flux", "--recipe", "nope"], 2, "unknown recipe 'nope'"),
    (["quantize", "tiny-flux", "--rank", "20"], 2, "QuantConfig.rank=20 is invalid"),
    (["quantize", "tiny-flux", "--precision", "int3"], 2, "QuantConfig.precision='int3' is invalid"),
    (["quantize", "tiny-flux", "--device", "tpu"], 2, "device='tpu' is invalid"),
    (["quantize", "tiny-flux", "--until", "bake"], 2, "unknown stage 'bake'"),
    (["recipes", "nope"], 2, "unknown recipe 'nope'"),
    (["status", "/nonexistent/run"], 2, "is not an svdq run directory"),
    (["export", "/nonexistent/run"], 2, "is not an svdq run directory"),
    (["inspect", "/nonexistent/file.safetensors"], 2, "does not exist"),
])
def test_bad_arguments(args, code, message, tmp_path):
    if args[0] == "quantize":
        args += ["--out", str(tmp_path / "run")]
    got, _, stderr = svdq(*args)
    assert got == code
    assert message in one_line_error(stderr)


def test_rank_larger_than_a_layer(tmp_path, recipe_file):
    code, _, stderr = svdq("quantize", "tiny-flux", "--recipe", recipe_file, "--rank", "144", "--out", tmp_path / "r")
    assert code == 2 and "--rank 144 exceeds layer" in one_line_error(stderr)


@pytest.mark.parametrize("content,suffix,message", [
    ("", ".txt", "holds no prompts"),
    ("{not json", ".json", "is not valid JSON"),
    ("title\nhello\n", ".csv", "has no 'prompt' column"),
])
def test_bad_prompt_files(tmp_path, recipe_file, content, suffix, message):
    prompts = tmp_path / f"prompts{suffix}"
    prompts.write_text(content)
    code, _, stderr = svdq("quantize", "tiny-flux", "--recipe", recipe_file, "--prompts", prompts,
                           "--out", tmp_path / "run")
    assert code == 2 and message in one_line_error(stderr)


def test_unreadable_prompt_file(tmp_path, recipe_file):
    code, _, stderr = svdq("quantize", "tiny-flux", "--recipe", recipe_file, "--prompts", tmp_path / "missing.txt",
                           "--out", tmp_path / "run")
    assert code == 2 and "does not exist" in one_line_error(stderr)


def test_run_directory_held_by_another_process(run_copy, recipe_file):
    manifest_before = (run_copy / "manifest.json").read_bytes()
    with open(run_copy / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.truncate(0)
        handle.write("4242")
        handle.flush()
        code, _, stderr = svdq("quantize", "tiny-flux", "--recipe", recipe_file, "--out", run_copy)
        assert code == 2 and "is in use by process 4242" in one_line_error(stderr)
        assert "choose another --out" in stderr  # quantize can write elsewhere
        code, _, stderr = svdq("export", run_copy)
        line = one_line_error(stderr)
        assert code == 2 and "is in use by process 4242" in line and "--out" not in line  # export has no --out
    assert (run_copy / "manifest.json").read_bytes() == manifest_before


def test_unwritable_run_directory(tmp_path, recipe_file):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, stderr = svdq("quantize", "tiny-flux", "--recipe", recipe_file, "--out", blocker / "run")
    assert code == 2 and "is not writable" in one_line_error(stderr)


def test_offline_hub_model_says_how_to_pass_a_local_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, stderr = svdq("quantize", "some-org/some-model", "--out", tmp_path / "run")
    line = one_line_error(stderr)
    assert code == 1 and "could not fetch some-org/some-model" in line and "--local-dir DIR" in line


def test_not_our_file_for_inspect(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, path)
    code, _, stderr = svdq("inspect", path)
    assert code == 2 and "is not an svdq export" in one_line_error(stderr)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    code, _, stderr = svdq("inspect", tmp_path / "junk.safetensors")
    assert code == 2 and "is not a safetensors file" in one_line_error(stderr)


def test_recipes_listing_and_resolution():
    code, stdout, _ = svdq("recipes", "--json")
    listing = json.loads(stdout)
    assert code == 0 and {"flux-dev", "flux-schnell", "pixart-sigma", "sana", "sd3", "tiny-flux", "tiny-pixart",
                          "tiny-sana", "tiny-sd3"} <= set(listing)
    code, stdout, _ = svdq("recipes", "flux-dev", "--json")
    resolved = json.loads(stdout)
    assert resolved["quant"]["rank"] == 32 and resolved["calibration"]["steps"] == 50
    assert resolved["quant"]["alphas"][0] == 0.05


def test_help_explains_every_option():
    code, stdout, _ = svdq("quantize", "--help")
    assert code == 0
    for option in ("--rank", "--precision", "--out", "--prompts", "--num-prompts", "--steps", "--resolution",
                   "--until", "--redo", "--json", "--device", "--dtype", "--offload"):
        assert option in stdout
