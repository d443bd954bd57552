"""The bad-input battery: every case is one line on stderr naming the bad thing, a documented exit code, no
traceback, and nothing destroyed — existing run artifacts and exports checksummed before and after.

(test_bad_input.py holds the first cases; these add what a newcomer and a CI job were seen to hit.)
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from svdq_cli.models.registry import ADAPTERS
from tests.conftest import svdq
from tests.stages.test_runner import export_file


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def snapshot(path) -> dict[str, str]:
    """sha256 of every file below ``path`` (the lock file's pid aside)."""
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file() and f.name != ".lock"}


def fails(args, code, message, untouched=()):
    """Run svdq; assert the exit code, the one-line message, and that ``untouched`` paths did not change."""
    before = [snapshot(path) for path in untouched]
    got, stdout, stderr = svdq(*args)
    assert got == code, (got, stderr)
    line = one_line_error(stderr)
    assert message in line, line
    assert [snapshot(path) for path in untouched] == before, "an existing artifact changed"
    return line


# ---------------------------------------------------------------- the command line itself
def test_version_and_short_help():
    code, stdout, _ = svdq("--version")
    assert code == 0 and stdout.strip().startswith("svdq ")
    code, stdout, _ = svdq("-h")
    assert code == 0 and "quantize" in stdout
    code, stdout, _ = svdq("quantize", "-h")
    assert code == 0 and "--val-steps" in stdout and "<bool>" not in stdout.replace("--help", "")


@pytest.mark.parametrize("args,message", [
    (["quantize", "tiny-flux", "--rank", "abc"], "Invalid value for '--rank'"),
    (["quantize"], "Missing argument 'model'"),
    (["quantize", "tiny-flux", "--rnak", "32"], "No such option: --rnak (Possible options: --rank)"),
    (["quantise", "tiny-flux"], "No such command 'quantise'. Did you mean 'quantize'?"),
    (["status"], "Missing argument 'run_dir'"),
])
def test_usage_errors_exit_2_in_one_line(args, message):
    assert "--help" in fails(args, 2, message)


def test_debug_is_accepted_after_the_command(tmp_path):
    code, _, stderr = svdq("status", tmp_path / "nowhere", "--debug")
    assert code == 2 and "Traceback" in stderr and stderr.strip().splitlines()[-1].startswith("Error: ")


# ---------------------------------------------------------------- recipes and flags, before anything is touched
ALIAS_BOMB = ("model: tiny-flux\nfamily: tiny-flux\ncalibration:\n  prompts: [&a [" + ", ".join(["lol"] * 9) + "]"
              + "".join(f", &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefg", "bcdefgh", strict=True))
              + "]\n")  # each level nine aliases of the one before: 9^8 strings


@pytest.mark.parametrize("recipe,message", [
    ("model: tiny-flux\nfamily: tiny-flux\nquant: {alpa: 0.5}\n", "quant.alpa: unknown key (did you mean alphas?)"),
    ("model: tiny-flux\nfamily: tiny-flux\nquant: {rank: thirty-two}\n", "quant.rank: expected int"),
    ("model: tiny-flux\nfamily: tiny-flux\ncalibration: {num_prompts: true}\n", "num_prompts: expected"),
    ("model: tiny-flux\nfamily: flux-xxl\n", "unknown model family 'flux-xxl'"),
    ("model: [unclosed\n", "cannot read recipe"),
    ("model: tiny-flux\nfamily: tiny-flux\nquant: {method: awq}\n", "QuantConfig.method='awq' is invalid"),
    ("model: tiny-flux\nfamily: tiny-flux\nquant: {precision: fp3}\n", "QuantConfig.precision='fp3' is invalid"),
    ("model: tiny-flux\nfamily: tiny-flux\nquant: {rank: -16}\n", "QuantConfig.rank=-16 is invalid"),
    ("model: tiny-flux\nfamily: tiny-flux\ncalibration: {num_prompts: 0}\n", "num_prompts=0 must be at least 1"),
    ("- a list\n- not a mapping\n", "must be a mapping"),
    ("model: tiny-flux\nfamily: tiny-flux\ndevice: tpu\n", "device='tpu' is invalid"),
    ("model: tiny-flux\nfamily: tiny-flux\nvalidation: {runtime: gpu}\n", "validation.runtime='gpu' is invalid"),
    ("model: tiny-flux\nfamily: tiny-flux\nvalidation: {min_psnr: .nan}\n", "min_psnr=nan must be a finite number"),
    ("model: tiny-flux\nfamily: tiny-flux\nquant: {rank: 16\n", "cannot read recipe"),
    (ALIAS_BOMB, "its YAML aliases expand to more than 10,000 values"),  # 9^8 strings: billions of bytes
    ("model: tiny-flux\nfamily: tiny-flux\ncalibration: {prompts: &a [x, *a]}\n", "refers to a value that contains"),
    ("model: tiny-flux\nfamily: tiny-flux\ncalibration: {prompts: " + "[" * 3000 + "]" * 3000 + "}\n",
     "nests its values thousands of levels deep"),
    ("model: tiny-flux\nfamily: tiny-flux\ncalibration: {prompts: [" + "p, " * 5000 + "]}\n",
     "calibration.prompts: expected str, got ['p', 'p', 'p', 'p', ...]"),  # the value cut, not echoed whole
    ("model: tiny-flux\nfamily: tiny-flux\ncalibration: {resolution: 1000000000}\n",
     "calibration.resolution=1000000000 (--resolution) exceeds 16,384"),
])
def test_bad_recipe_files(tmp_path, recipe, message):
    path = tmp_path / "bad.yaml"
    path.write_text(recipe)
    fails(["quantize", "tiny-flux", "--recipe", path, "--out", tmp_path / "run"], 2, message)
    assert not (tmp_path / "run").exists()


def test_a_recipe_may_use_anchors_within_bounds(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("model: tiny-flux\nfamily: tiny-flux\ncalibration: &settings {steps: 2, resolution: 32}\n"
                    "validation: *settings\n")
    code, stdout, stderr = svdq("recipes", path, "--json")
    assert code == 0, stderr
    resolved = json.loads(stdout)
    assert resolved["validation"]["steps"] == 2 and resolved["validation"]["resolution"] == 32


def test_an_oversized_recipe_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("model: tiny-flux\nfamily: tiny-flux\n" + "# padding\n" * 120_000)
    fails(["quantize", "tiny-flux", "--recipe", path, "--out", tmp_path / "run"], 2, "a recipe is a small YAML file")


@pytest.mark.parametrize("flags,message", [
    (["--until", "bake"], "unknown stage 'bake'"),
    (["--redo", "export", "--until", "collect"], "--redo export comes after --until collect"),
    (["--device", "cuda"], "use --device cpu"),
    (["--device", "cuda:7"], "is not available"),
    (["--prompts", "builtin:nope"], "unknown prompt set 'builtin:nope'"),
    (["--prompts", "hf:some-org/some-prompts"], "pass a local prompt file"),
    (["--resolution", "1000000000"], "calibration.resolution=1000000000 (--resolution) exceeds 16,384"),
    (["--val-resolution", "999999744"], "validation.resolution=999999744 (--val-resolution) exceeds 16,384"),
    (["--steps", "100000000"], "calibration.steps=100000000 (--steps) exceeds 10,000"),
    (["--val-steps", "20000"], "validation.steps=20000 (--val-steps) exceeds 10,000"),
])
def test_bad_flags_fail_before_the_run_directory_exists(tmp_path, recipe_file, flags, message):
    if "cuda" in " ".join(flags) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    fails(["quantize", "tiny-flux", "--recipe", recipe_file, "--out", tmp_path / "run", *flags], 2, message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name,content,message", [
    ("binary.txt", b"\xff\xfe\x00\x81 not text", "cannot read prompt file"),
    ("object.json", b'{"prompt": "a cat"}', "must hold a JSON list"),
    ("numbers.json", b"[1, 2, 3]", "holds no prompts"),
    ("huge.txt", b"word " * 2000, "characters long"),
    ("huge.csv", b"prompt\n" + b"x" * 200_000, "is malformed"),
    ("deep.json", b"[" * 100_000 + b"]" * 100_000, "nests its JSON thousands of levels deep"),
])
def test_bad_prompt_files(tmp_path, recipe_file, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    fails(["quantize", "tiny-flux", "--recipe", recipe_file, "--prompts", path, "--out", tmp_path / "run"], 2,
          message)
    assert not (tmp_path / "run").exists()


def test_more_prompts_than_a_set_holds_is_said(tmp_path, recipe_file):
    prompts = tmp_path / "three.txt"
    prompts.write_text("a red fox\na blue house\na green tree\n")
    code, stdout, stderr = svdq("quantize", "tiny-flux", "--recipe", recipe_file, "--prompts", prompts,
                                "--num-prompts", "1000000", "--until", "collect", "--out", tmp_path / "run", "--json")
    assert code == 0, stderr
    assert "holds 3; using all 3, not 1000000" in stderr
    assert json.loads(stdout)["stages"]["collect"]["prompts"] == 3


# ---------------------------------------------------------------- models
@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    """tiny-flux saved as a diffusers directory, as a user's local model would be."""
    path = tmp_path_factory.mktemp("models") / "tiny-flux-dir"
    ADAPTERS["tiny-flux"].build_tiny(0, torch.float32).save_pretrained(path)
    return path


def test_local_diffusers_directory_runs_on_the_cpu_with_a_notice(tmp_path, flux_dir):
    code, stdout, stderr = svdq("quantize", flux_dir, "--out", tmp_path / "run", "--until", "collect",
                                "--num-prompts", "1", "--steps", "1", "--resolution", "64")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert code == 0, stderr
    assert "device: cpu (no CUDA device" in stderr


def test_a_recipe_forced_onto_another_pipeline_class_is_one_line(tmp_path, flux_dir):
    """A FluxKontextPipeline directory quantized with --recipe tiny-flux used to load as a text-to-image Flux."""
    import shutil

    kontext = tmp_path / "kontext"
    shutil.copytree(flux_dir, kontext)
    index = json.loads((kontext / "model_index.json").read_text())
    (kontext / "model_index.json").write_text(json.dumps({**index, "_class_name": "FluxKontextPipeline"}))
    fails(["quantize", kontext, "--recipe", "tiny-flux", "--out", tmp_path / "run"], 2,
          f"Error: {kontext} is a FluxKontextPipeline; the tiny-flux recipe drives a FluxPipeline. Leave --recipe "
          "out (or use --recipe diffusers) to drive the FluxKontextPipeline itself")
    assert not (tmp_path / "run" / "collect").exists()


def test_validation_is_sized_from_the_command_line(tmp_path, flux_dir):
    code, stdout, stderr = svdq("quantize", flux_dir, "--out", tmp_path / "run", "--num-prompts", "1", "--steps", "1",
                                "--resolution", "64", "--val-prompts", "1", "--val-steps", "1",
                                "--val-resolution", "32", "--json")
    assert code == 0, stderr
    report = json.loads((tmp_path / "run" / "validate" / "report.json").read_text())
    assert len(report["prompts"]) == 1
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["validation"]["steps"] == 1 and manifest["config"]["validation"]["resolution"] == 32


@pytest.mark.parametrize("damage,message", [
    ("empty", "not a diffusers pipeline directory"),
    ("pipeline", "StableDiffusionPipeline has no transformer or unet component"),
    ("truncated", "cannot load"),
    ("config", "its config and weights disagree"),
])
def test_bad_model_directories(tmp_path, flux_dir, damage, message):
    model = tmp_path / "model"
    if damage == "empty":
        model.mkdir()
    else:
        shutil.copytree(flux_dir, model)
    if damage == "pipeline":
        index = json.loads((model / "model_index.json").read_text())
        del index["transformer"]
        (model / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    elif damage == "truncated":
        weights = next((model / "transformer").glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "config":
        config = json.loads((model / "transformer" / "config.json").read_text())
        (model / "transformer" / "config.json").write_text(json.dumps({**config, "num_single_layers": 5}))
    fails(["quantize", model, "--out", tmp_path / "run", "--num-prompts", "1", "--steps", "1"], 2, message)


def test_an_offline_hub_id_fails_fast_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr("svdq_cli.system.online.hub_reachable", lambda: False)
    line = fails(["quantize", "some-org/some-model", "--out", tmp_path / "run"], 1, "could not fetch")
    assert "--local-dir DIR" in line


@pytest.mark.parametrize("flag,value,message", [
    ("--rank", "4096", "--rank 4096 exceeds layer"),
    ("--resolution", "102", "--resolution 102 is not a multiple of 4"),
    ("--val-resolution", "30", "--val-resolution 30 is not a multiple of 4"),
    ("--steps", "5000", "--steps 5000 exceeds the scheduler's 1000 training timesteps"),
    ("--val-steps", "1001", "--val-steps 1001 exceeds the scheduler's 1000 training timesteps"),
])
def test_model_checks_come_before_any_stage_runs(tmp_path, recipe_file, flag, value, message):
    fails(["quantize", "tiny-flux", "--recipe", recipe_file, flag, value, "--out", tmp_path / "run"], 2, message)
    assert not list((tmp_path / "run").glob("*/*.safetensors")), "a stage ran before the check"


def test_a_resolution_beyond_memory_is_refused_with_what_fits(tmp_path, recipe_file, monkeypatch):
    monkeypatch.setattr("svdq_cli.stages.workspace.free_memory", lambda device: 2**30)  # a machine with 1 GiB free
    line = fails(["quantize", "tiny-flux", "--recipe", recipe_file, "--resolution", "4096", "--out", tmp_path / "run"],
                 2, "--resolution 4096 needs about")
    fits = int(re.search(r"at most about (\d+) px fits", line).group(1))
    assert 0 < fits < 4096 and fits % 4 == 0
    assert not list((tmp_path / "run").glob("*/*.safetensors")), "a stage ran before the check"


def test_a_resolution_beyond_the_position_embedding_is_refused(tmp_path):
    fails(["quantize", "tiny-sd3", "--resolution", "512", "--out", tmp_path / "run"], 2,
          "--resolution 512 exceeds the 384 px its position embedding covers (pos_embed_max_size 96)")


def test_a_run_directory_inside_the_model_is_refused(tmp_path, flux_dir):
    for out in (flux_dir, flux_dir / "run"):
        fails(["quantize", flux_dir, "--out", out, "--num-prompts", "1", "--steps", "1"], 2,
              "is inside the model directory")
    assert not (flux_dir / "run").exists() and not (flux_dir / "manifest.json").exists()


# ---------------------------------------------------------------- run directories
def test_another_model_into_a_run_directory_is_refused(run_copy, recipe_file, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(recipe_file.read_text().replace("model: tiny-flux\nfamily: tiny-flux", "model: tiny-sd3\nfamily: "
                                                     "tiny-sd3"))
    fails(["quantize", "tiny-sd3", "--recipe", other, "--out", run_copy], 2, "holds a run of tiny-flux",
          untouched=[run_copy])


def test_another_rank_keeps_the_earlier_export(run_copy, recipe_file):
    earlier = export_file(run_copy)
    content = earlier.read_bytes()
    code, _, stderr = svdq("quantize", "tiny-flux", "--recipe", recipe_file, "--out", run_copy, "--rank", "32")
    assert code == 0, stderr
    assert earlier.read_bytes() == content and export_file(run_copy) != earlier
    code, stdout, _ = svdq("status", run_copy, "--json")
    assert json.loads(stdout)["previous_exports"] == [f"export/{earlier.name}"]


@pytest.mark.parametrize("manifest,code,message", [
    ("{not json", 2, "is unreadable"),
    ("[1, 2]", 2, "is not an svdq manifest"),
    ('{"format": 99, "stages": {}}', 2, "written by a newer svdq"),
])
def test_damaged_manifests(run_copy, manifest, code, message):
    (run_copy / "manifest.json").write_text(manifest)
    line = fails(["status", run_copy], code, message, untouched=[run_copy])
    if code == 2 and "newer" not in message:
        assert "reuses every artifact that still verifies" in line


def test_a_corrupted_manifest_is_rebuilt_from_what_verifies(run_copy, recipe_file, finished_run):
    (run_copy / "manifest.json").write_text("{not json")
    blocks = sorted((run_copy / "quantize").glob("*.safetensors"))
    stamps = {path: path.stat().st_mtime_ns for path in blocks}
    code, stdout, stderr = svdq("quantize", "tiny-flux", "--recipe", recipe_file, "--out", run_copy, "--json")
    assert code == 0, stderr
    assert "set aside as manifest.json.corrupt-" in stderr
    assert list(run_copy.glob("manifest.json.corrupt-*")), "the damaged manifest was deleted"
    stages = json.loads(stdout)["stages"]
    assert stages["collect"]["status"] == "resumed" and stages["quantize"]["status"] == "resumed"
    assert {path: path.stat().st_mtime_ns for path in blocks} == stamps, "verified blocks were recomputed"
    assert export_file(run_copy).read_bytes() == export_file(finished_run).read_bytes()


def test_a_killed_run_reads_as_interrupted(run_copy):
    manifest = json.loads((run_copy / "manifest.json").read_text())
    manifest["stages"]["validate"]["status"] = "running"
    (run_copy / "manifest.json").write_text(json.dumps(manifest))
    code, stdout, _ = svdq("status", run_copy)
    assert code == 0 and "interrupted" in stdout and "re-run the same" in stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only filesystem needs root")
def test_a_read_only_run_directory(tmp_path, recipe_file):
    target = tmp_path / "ro"
    target.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        fails(["quantize", "tiny-flux", "--recipe", recipe_file, "--out", target / "run"], 2, "is not writable")
    finally:
        subprocess.run(["umount", str(target)])


def test_artifacts_follow_the_umask(finished_run):
    for path in (finished_run / "manifest.json", export_file(finished_run),
                 finished_run / "collect" / "block-000.safetensors"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask(), path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- exports and inspect
def test_bad_files_for_inspect(tmp_path):
    (tmp_path / "zero.safetensors").write_bytes(b"")
    fails(["inspect", tmp_path / "zero.safetensors"], 2, "is not a safetensors file")
    fails(["inspect", tmp_path], 2, "is a directory")
    path = tmp_path / "bad-json.safetensors"
    save_file({"x": torch.zeros(2)}, path, metadata={"format_version": "1", "quantization_config": "{oops"})
    fails(["inspect", path], 2, "metadata 'quantization_config' is not valid JSON")


def test_an_export_of_another_format_version_is_refused_by_every_reader(finished_run, tmp_path):
    """The loader, inspect and lora apply all refuse a format this svdq does not know; lora writes nothing."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from svdq_cli import BadInputError
    from svdq_cli.formats.svdq_file import load_quantized

    source = export_file(finished_run)
    with safe_open(str(source), "pt") as handle:
        metadata = handle.metadata()
    path = tmp_path / "v99.safetensors"
    save_file(load_file(str(source)), path, metadata={**metadata, "format_version": "99"})
    message = "has export format 99; this svdq reads 1, 2"
    with pytest.raises(BadInputError, match=message):
        load_quantized(path)
    fails(["inspect", path], 2, message)
    lora = tmp_path / "lora.safetensors"
    save_file({"transformer.x.lora_A.weight": torch.zeros(4, 8), "transformer.x.lora_B.weight": torch.zeros(8, 4)},
              lora)
    fails(["lora", "apply", path, lora, "--out", tmp_path / "out.safetensors"], 2, message)
    assert not (tmp_path / "out.safetensors").exists()


def test_a_format_1_export_still_loads_with_its_symmetric_activations(finished_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from svdq_cli.formats.svdq_file import load_quantized
    from svdq_cli.runtime.linear import SVDQLinear

    source = export_file(finished_run)
    with safe_open(str(source), "pt") as handle:
        metadata = handle.metadata()
    layers = {name: {k: v for k, v in facts.items() if k != "act_range"}
              for name, facts in json.loads(metadata["layers"]).items()}  # as svdq wrote them before format 2
    path = tmp_path / "v1.safetensors"
    save_file(load_file(str(source)), path, metadata={**metadata, "format_version": "1", "layers": json.dumps(layers)})
    transformer = load_quantized(path)
    ranges = {module.act_range for module in transformer.modules() if isinstance(module, SVDQLinear)}
    assert ranges == {"symmetric"}
    current = {module.act_range for module in load_quantized(source).modules() if isinstance(module, SVDQLinear)}
    assert current == {"full"}


def test_inspect_reads_the_nunchaku_file_svdq_writes(bf16_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(bf16_run, run)
    code, _, stderr = svdq("export", run, "--format", "nunchaku")
    assert code == 0, stderr
    assert "attention_head_dim 32: Nunchaku's fused QKV epilogue runs head_dim 128 only" in stderr
    nunchaku = next((run / "export" / "nunchaku").glob("*.safetensors"))
    code, stdout, stderr = svdq("inspect", nunchaku, "--json")
    assert code == 0, stderr
    info = json.loads(stdout)
    assert info["format"] == "nunchaku" and info["model"] == "tiny-flux" and info["quantized_layers"] > 0


def test_loading_an_export_refuses_what_cannot_work(finished_run):
    from svdq_cli import BadInputError
    from svdq_cli.formats.svdq_file import load_quantized

    if not torch.cuda.is_available():
        with pytest.raises(BadInputError, match="use --device cpu"):
            load_quantized(export_file(finished_run), device="cuda")
    other = ADAPTERS["tiny-flux-deep"].build_tiny(0, torch.float32)  # same class, other depth
    with pytest.raises(BadInputError, match="num_layers"):
        load_quantized(export_file(finished_run), pipeline=other)


def test_quantize_model_refuses_patterns_that_match_nothing():
    from torch import nn

    from svdq_cli import BadInputError, quantize_model

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    batch = torch.randn(4, 64)
    with pytest.raises(BadInputError, match=re.escape("skip pattern(s) 'typo' match no nn.Linear")):
        quantize_model(model, lambda m: m(batch), skip=["typo"])
    with pytest.raises(BadInputError, match=re.escape("weight_only pattern(s) '*norm*' match no quantized layer")):
        quantize_model(model, lambda m: m(batch), weight_only=["*norm*"])


# ---------------------------------------------------------------- validation gates
def test_a_failed_gate_is_named_and_does_not_block_export(run_copy):
    line = fails(["validate", run_copy, "--min-psnr", "99"], 3, "validation gate failed (min_psnr: ")
    assert "< 99" in line
    code, _, stderr = svdq("export", run_copy)
    assert code == 0 and "validation gate failed (min_psnr" in stderr
    fails(["push-to-hub", run_copy, "me/model", "--dry-run"], 2, "failed its validation gates (min_psnr")
    fails(["validate", run_copy, "--min-psnr", "nan"], 2, "min_psnr=nan must be a finite number")


# ---------------------------------------------------------------- LoRA
def test_lora_refusals(run_copy, tmp_path):
    export = export_file(run_copy)
    lora = tmp_path / "style.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 128) * 0.01,
               "transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(128, 4) * 0.01}, lora)
    fails(["lora", "apply", export, lora, "--out", export], 2, "is the export itself", untouched=[run_copy])
    fails(["lora", "apply", export, lora, "--scale", "nan", "--out", tmp_path / "x.safetensors"], 2,
          "--scale nan is not a finite number", untouched=[run_copy])
    fails(["lora", "apply", export, tmp_path / "missing.safetensors", "--out", tmp_path / "y.safetensors"], 2,
          "missing.safetensors", untouched=[run_copy])
    once = tmp_path / "once.safetensors"
    code, _, stderr = svdq("lora", "apply", export, lora, "--out", once)
    assert code == 0, stderr
    fails(["lora", "apply", once, lora, "--out", tmp_path / "twice.safetensors"], 2, "is already applied",
          untouched=[run_copy])
    fails(["lora", "apply", export, lora, lora, "--out", tmp_path / "double.safetensors"], 2, "is already applied")
    poisoned = tmp_path / "nan.safetensors"
    up = torch.randn(128, 4) * 0.01
    up[3, 1] = float("nan")
    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 128) * 0.01,
               "transformer_blocks.0.attn.to_q.lora_B.weight": up}, poisoned)
    fails(["lora", "apply", export, poisoned, "--out", tmp_path / "nan-out.safetensors"], 2,
          "tensor transformer_blocks.0.attn.to_q.lora_B.weight holds NaN or Inf", untouched=[run_copy])
    assert not (tmp_path / "nan-out.safetensors").exists()


# ---------------------------------------------------------------- the Hub
def test_push_offline_with_a_token_fails_fast(run_copy, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setattr("svdq_cli.system.online.hub_reachable", lambda: False)
    line = fails(["push-to-hub", run_copy, "me/tiny-flux-svdq"], 1, "cannot reach the Hugging Face Hub",
                 untouched=[run_copy])
    assert "hf_not_a_real_token" not in line


@pytest.mark.parametrize("repo_id", ["hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345", "me/hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345"])
def test_a_token_passed_as_the_repo_id_is_refused_and_never_printed(run_copy, repo_id):
    got, stdout, stderr = svdq("push-to-hub", run_copy, repo_id, "--dry-run")
    assert got == 2, stderr
    assert "looks like a Hugging Face token" in one_line_error(stderr)
    assert "AbCdEfGh" not in stdout + stderr


# ---------------------------------------------------------------- signals, disk, threads (subprocesses)
def _cli(args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "svdq_cli", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kwargs)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="a small tmpfs needs root to mount")
def test_disk_full_is_one_line_and_a_rerun_completes(tmp_path, recipe_file, finished_run):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        args = ["quantize", "tiny-flux", "--recipe", recipe_file, "--out", mount / "run"]
        full = _cli(args)
        assert full.returncode == 1, full.stderr[-2000:]
        assert "no space left on the device writing" in one_line_error(full.stderr)
        assert not list(mount.rglob("*.tmp")), "a half-written temporary file was left behind"
        subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)
        resumed = _cli(args)
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert export_file(mount / "run").read_bytes() == export_file(finished_run).read_bytes()
    finally:
        subprocess.run(["umount", str(mount)])


@pytest.mark.slow
def test_exports_do_not_depend_on_the_thread_count(tmp_path, recipe_file):
    exports = []
    for threads in ("1", "3"):  # as machines whose torch defaults and core counts differ
        run = tmp_path / f"threads-{threads}"
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "SVDQ_WORKERS": threads}
        result = _cli(["quantize", "tiny-flux", "--recipe", recipe_file, "--out", run], env)
        assert result.returncode == 0, result.stderr[-2000:]
        exports.append(export_file(run).read_bytes())
    assert exports[0] == exports[1]


def test_a_full_size_protocol_on_a_cpu_says_what_it_will_cost(flux_dir, capsys):
    from svdq_cli.cli.quantize import resolve_model
    from svdq_cli.stages.workspace import Workspace

    config = resolve_model(str(flux_dir), None, {"device": "cpu"})  # a local Flux directory: flux-dev's protocol
    assert config.calibration.steps == 50 and config.validation.resolution == 1024
    workspace = Workspace(config)
    workspace.say_cpu_cost(["collect", "validate"])
    notices = [line for line in capsys.readouterr().err.splitlines() if "on this CPU (estimated" in line]
    assert len(notices) == 2
    assert notices[0].startswith("collect: about") and "size it with --num-prompts/--steps/--resolution" in notices[0]
    assert notices[1].startswith("validate: about") and "--val-prompts/--val-steps/--val-resolution" in notices[1]


def test_float16_on_a_cpu_runs_in_float32_with_one_line(tmp_path, recipe_file):
    """SD3 in its recipe's float16 on a CPU failed with "Input type (c10::Half) and bias type (float)"."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device runs float16 as asked")
    code, _, stderr = svdq("quantize", "tiny-flux", "--recipe", recipe_file, "--dtype", "float16", "--device", "cpu",
                           "--out", tmp_path / "run", "--until", "collect")
    assert code == 0, stderr
    assert "dtype: float16 runs in float32 on the CPU" in stderr
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["config"]["dtype"] == "float32"
