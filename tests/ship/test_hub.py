"""push-to-hub at huggingface_hub's API boundary: the upload call gets the right files and card."""

import json

import pytest
import yaml

from tests.conftest import failed_copy, svdq


@pytest.fixture
def fake_hub(monkeypatch):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs, self.token)

    def create_commit(self, repo_id, operations, **kwargs):
        calls["commit"] = (repo_id, {op.path_in_repo: op for op in operations}, kwargs)

        class Info:
            commit_url = f"https://hub.example/{repo_id}/commit/1"

        return Info()

    monkeypatch.setattr("huggingface_hub.HfApi.create_repo", create_repo)
    monkeypatch.setattr("huggingface_hub.HfApi.create_commit", create_commit)
    monkeypatch.setattr("svdq_cli.system.online.hub_reachable", lambda: True)  # the fake Hub is always there
    return calls


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    header, _, body = card[4:].partition("\n---\n")
    assert "# " in body and "| method | PSNR (dB) |" in body and "load_quantized_pipeline" in body
    return yaml.safe_load(header)


def test_dry_run_prints_files_and_a_valid_card(finished_run, fake_hub):
    code, stdout, stderr = svdq("push-to-hub", finished_run, "me/tiny-flux-svdq", "--dry-run", "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["files"] == ["svdq-int4_r16-tiny-flux.safetensors", "comparison.png", "README.md", "recipe.yaml"]
    meta = front_matter(result["card"])
    assert meta["library_name"] == "diffusers" and "svdquant" in meta["tags"] and "int4" in meta["tags"]
    assert "base_model" not in meta  # a built-in tiny model has no Hub base
    assert not fake_hub


def test_upload_sends_one_commit_with_every_file(finished_run, fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    code, stdout, stderr = svdq("push-to-hub", finished_run, "me/tiny-flux-svdq", "--private", "--create-pr",
                                "--json")
    assert code == 0, stderr
    repo, kwargs, token = fake_hub["create_repo"]
    assert repo == "me/tiny-flux-svdq" and kwargs["private"] is True and token == "hf_secret_value"
    repo, operations, commit_kwargs = fake_hub["commit"]
    assert set(operations) == {"svdq-int4_r16-tiny-flux.safetensors", "comparison.png", "README.md", "recipe.yaml"}
    assert commit_kwargs["create_pr"] is True
    front_matter(operations["README.md"].path_or_fileobj.decode())
    assert yaml.safe_load(operations["recipe.yaml"].path_or_fileobj.decode())["family"] == "tiny-flux"
    assert "hf_secret_value" not in stdout + stderr
    assert all(b"hf_secret_value" not in p.read_bytes() for p in finished_run.rglob("*") if p.is_file())


def test_card_inherits_the_base_model_and_its_license():
    from svdq_cli.ship.hub import model_card

    metadata = {"recipe": {"model": "black-forest-labs/FLUX.1-schnell"}, "svdq_version": "0.1.0",
                "quantization_config": {"method": "svdquant", "precision": "int4", "rank": 32, "group_size": 64,
                                        "gptq": False, "weight_only": False},
                "layers": {"a": {}}, "validate": {"ran": True, "methods": {"svdquant": {
                    "psnr": 30.0, "ssim": 0.9, "latent_error": 0.1}}}}
    meta = front_matter(model_card(metadata, "f.safetensors", "me/x", True))
    assert meta["base_model"] == "black-forest-labs/FLUX.1-schnell" and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "apache-2.0"


def test_model_card_of_a_vq_export_describes_vector_quantization():
    from svdq_cli.ship.hub import model_card

    metadata = {"recipe": {"model": "facebook/DiT-XL-2-256"}, "svdq_version": "0.1.0",
                "model_config": {"class": "DiTTransformer2DModel", "family": "dit"},
                "quantization_config": {"method": "vq4dit", "precision": "int4", "rank": 0, "bits": 2, "vq_dim": 4,
                                        "vq_candidates": 4, "vq_steps": 200},
                "layers": {"a": {}}, "validate": {"ran": True, "methods": {"vq4dit": {
                    "psnr": 30.0, "ssim": 0.9, "latent_error": 0.1}}}}
    card = model_card(metadata, "f.safetensors", "me/x", False)
    meta = front_matter(card)
    assert "vq4dit" in meta["tags"] and "vq2" in meta["tags"] and "pipeline_tag" not in meta
    assert "VQ4DiT 2-bit vector quantization" in card and "256 codewords" in card and "low-rank" not in card
    assert "class_labels=" in card


def test_push_bad_input(finished_run, tmp_path, fake_hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no cached login
    code, _, stderr = svdq("push-to-hub", finished_run, "me/x")
    assert code == 2 and "no Hugging Face token" in stderr
    code, _, stderr = svdq("push-to-hub", finished_run, "not a repo id!", "--dry-run")
    assert code == 2 and "invalid repo id" in stderr
    code, _, stderr = svdq("push-to-hub", tmp_path / "missing", "me/x", "--dry-run")
    assert code == 2 and "not an svdq run directory" in stderr
    run = failed_copy(finished_run, tmp_path)
    code, _, stderr = svdq("push-to-hub", run, "me/x", "--dry-run")
    assert code == 2 and "failed its validation gates" in stderr
    code, _, _ = svdq("push-to-hub", run, "me/x", "--dry-run", "--force")
    assert code == 0
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"].pop("export")
    (run / "manifest.json").write_text(json.dumps(manifest))
    code, _, stderr = svdq("push-to-hub", run, "me/x", "--dry-run")
    assert code == 2 and "has no export yet" in stderr
    assert not fake_hub
