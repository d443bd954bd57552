"""The evaluation's metrics on known cases and against float64 references, with fresh random images and the
small stand-in networks of :mod:`stand_ins` in place of the downloaded ones."""

from __future__ import annotations

import math

import pytest
import torch

from svdq_cli.errors import BadInputError
from svdq_cli.evaluation import metrics

from .stand_ins import PooledLinearFeatures, inject_image_reward, inject_lpips, tiny_clip


def images(gen: torch.Generator, count: int = 6, size: int = 32, low: int = 0, high: int = 256) -> torch.Tensor:
    return torch.randint(low, high, (count, 3, size, size), generator=gen, dtype=torch.uint8)


def scored(suite: metrics.Suite, generated: torch.Tensor, prompts: list[str], reference: torch.Tensor | None,
           batch: int = 4) -> dict:
    """The suite's scores, fed in batches as the evaluation reads its PNGs back."""
    parts = [(generated[i : i + batch], prompts[i : i + batch], None if reference is None else reference[i : i + batch])
             for i in range(0, len(generated), batch)]
    return suite.scores(parts)


def suite_of(names: list[str], networks: dict | None = None) -> metrics.Suite:
    return metrics.Suite(names, networks or {}, "cpu")


def test_psnr_is_infinite_for_identical_images_and_known_for_a_constant_shift(gen):
    base = images(gen, low=10, high=240)
    shift = int(torch.randint(1, 10, (1,), generator=gen))
    suite = suite_of(["psnr", "ssim"])
    same = scored(suite, base, ["p"] * len(base), base)
    assert math.isinf(same["psnr"]) and same["ssim"] == pytest.approx(1.0, abs=1e-6)
    shifted = scored(suite, base + shift, ["p"] * len(base), base)
    # rel 1e-6: torchmetrics takes 10 / ln 10 in float32, the rest in the images' float64
    assert shifted["psnr"] == pytest.approx(20 * math.log10(255 / shift), rel=1e-6)
    assert metrics.json_value(same["psnr"]) == "inf"


def test_psnr_and_ssim_match_float64_references(gen):
    generated, reference = images(gen), images(gen)
    values = scored(suite_of(["psnr", "ssim"]), generated, ["p"] * len(generated), reference)
    a, b = generated.double() / 255, reference.double() / 255
    mse = (a - b).pow(2).mean(dim=(1, 2, 3))
    assert values["psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-6)
    # SSIM with a uniform 7×7 window is not torchmetrics' Gaussian one: check the bound and the ordering
    near = (reference.int() + torch.randint(-3, 4, reference.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
    close = scored(suite_of(["ssim"]), near, ["p"] * len(near), reference)["ssim"]
    assert -1 <= values["ssim"] < close < 1


def test_fid_is_zero_for_the_same_set_and_the_known_shift_otherwise(gen, monkeypatch):
    network = PooledLinearFeatures(gen)
    monkeypatch.setattr(metrics, "inception", lambda: network)
    real = images(gen, count=40, low=20, high=230)
    shift = int(torch.randint(1, 20, (1,), generator=gen))
    suite = metrics.load(["fid"], True, "cpu", "unused", print)
    suite.set_real(real.split(8))
    prompts = ["p"] * len(real)
    assert scored(suite, real, prompts, None)["fid"] == pytest.approx(0.0, abs=1e-6)
    expected = float((shift / 255 * network.matrix.sum(dim=1)).pow(2).sum())
    assert scored(suite, real + shift, prompts, None)["fid"] == pytest.approx(expected, rel=1e-5)


def test_fid_matches_the_float64_formula_on_random_sets(gen, monkeypatch):
    network = PooledLinearFeatures(gen)
    monkeypatch.setattr(metrics, "inception", lambda: network)
    real, fake = images(gen, count=40), images(gen, count=30, low=40)
    suite = metrics.load(["fid"], True, "cpu", "unused", print)
    suite.set_real(real.split(8))
    value = scored(suite, fake, ["p"] * len(fake), None)["fid"]

    def statistics(batch):
        features = network(batch.double() / 255)
        return features.mean(0), torch.cov(features.T)

    (mu1, s1), (mu2, s2) = statistics(real), statistics(fake)
    eigenvalues, vectors = torch.linalg.eigh(s1)
    root = vectors @ torch.diag(eigenvalues.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root @ s2 @ root).clamp(min=0).sqrt().sum()
    expected = float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * cross)
    assert value == pytest.approx(expected, rel=1e-4)


def test_lpips_is_zero_for_identical_images_and_grows_with_the_difference(gen, monkeypatch):
    inject_lpips(monkeypatch)
    suite = metrics.load(["lpips"], True, "cpu", "unused", print)
    reference = images(gen, count=4, size=64)
    noise = torch.randn(reference.shape, generator=gen)
    prompts = ["p"] * 4
    same = scored(suite, reference, prompts, reference)["lpips"]
    small = scored(suite, (reference + 4 * noise).clamp(0, 255).to(torch.uint8), prompts, reference)["lpips"]
    large = scored(suite, (reference + 60 * noise).clamp(0, 255).to(torch.uint8), prompts, reference)["lpips"]
    assert same == pytest.approx(0.0, abs=1e-7) and 0 < small < large


def test_methods_scored_together_get_what_each_gets_alone(gen, monkeypatch):
    """The evaluation reads a batch of 16-bit images once for every method: each method's FID and LPIPS
    accumulate apart (copies sharing the feature networks), so scoring them together changes no figure."""
    network = PooledLinearFeatures(gen)
    monkeypatch.setattr(metrics, "inception", lambda: network)
    inject_lpips(monkeypatch)
    suite = metrics.load(["fid", "lpips", "psnr", "ssim"], True, "cpu", "unused", print)
    suite.set_real(images(gen, count=12, size=64).split(4))
    reference = images(gen, count=8, size=64)
    noise = torch.randn(reference.shape, generator=gen)
    outputs = {name: (reference.int() + scale * noise).clamp(0, 255).to(torch.uint8)
               for name, scale in (("near", 3), ("far", 40))}
    prompts = ["p"] * len(reference)
    alone = {"16-bit": scored(suite, reference, prompts, None),
             **{name: scored(suite, output, prompts, reference) for name, output in outputs.items()}}
    batches = [(prompts[i : i + 4], {"16-bit": (reference[i : i + 4], None),
                                     **{name: (output[i : i + 4], reference[i : i + 4])
                                        for name, output in outputs.items()}})
               for i in range(0, len(reference), 4)]
    together = suite.scores_by_method(batches)
    assert together.keys() == alone.keys()
    for method, values in alone.items():
        for name, value in values.items():
            assert together[method][name] == (None if value is None else pytest.approx(value, rel=1e-9)), method
    assert together["16-bit"]["lpips"] is None
    fid = suite.networks["fid"]
    assert metrics._fresh_copy(fid).inception is fid.inception  # a method costs no network
    assert together["near"]["lpips"] < together["far"]["lpips"]


def test_image_reward_is_the_mean_of_its_scores(gen, monkeypatch):
    inject_image_reward(monkeypatch)
    suite = metrics.load(["image-reward"], True, "cpu", "unused", print)
    generated = images(gen, count=5)
    prompts = ["a fox", "a cat on a mat", "x", "a long prompt about a lighthouse", "y"]
    expected = sum(float(generated[i].double().mean() / 255) + len(prompts[i]) / 100 for i in range(5)) / 5
    assert scored(suite, generated, prompts, None)["image-reward"] == pytest.approx(expected, rel=1e-12)


def test_clip_score_matches_the_float64_embeddings(gen, tmp_path):
    suite = metrics.load(["clip"], True, "cpu", str(tiny_clip(tmp_path / "clip")), print)
    generated = images(gen, count=5, size=48)
    prompts = ["a red fox", "a cat on a mat", "snow", "a lighthouse at dusk", "two dogs"]
    value = scored(suite, generated, prompts, None)["clip"]
    scorer = suite.networks["clip"]
    model = scorer.model.double()
    inputs = scorer.processor(text=prompts, images=list(generated), return_tensors="pt", padding=True)
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"].double()).pooler_output)
        text = model.text_projection(model.text_model(input_ids=inputs["input_ids"],
                                                      attention_mask=inputs["attention_mask"]).pooler_output)
    cosine = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    assert value == pytest.approx(float((100 * cosine).clamp(min=0).mean()), rel=1e-5, abs=1e-6)


def test_metrics_that_cannot_load_stop_when_named_and_are_skipped_otherwise(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ImageReward", None)  # the package is not installed
    with pytest.raises(metrics.MetricUnavailable, match=r"image-reward package \(pip install 'svdq\[eval\]'\)"):
        metrics.load(["image-reward"], True, "cpu", "unused", print)
    said = []
    suite = metrics.load(["psnr", "image-reward"], False, "cpu", "unused", said.append)
    assert suite.names == ["psnr"] and "image-reward" in suite.skipped and said[0].startswith("image-reward: skipped")


def test_metric_names_are_checked():
    assert metrics.parse(None) == (list(metrics.ALL), False)
    assert metrics.parse("PSNR, lpips,psnr") == (["psnr", "lpips"], True)
    with pytest.raises(BadInputError, match="unknown metric.*fdi"):
        metrics.parse("psnr,fdi")
