"""Small stand-ins for the evaluation's feature networks (random weights, no download), injected where the
libraries load their own: FID's Inception through svdq's ``metrics.inception`` hook (torchmetrics takes any
module), LPIPS's AlexNet where torchmetrics asks torchvision for it, ImageReward as its package, and a tiny
CLIP saved as a local model directory."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch
from torch import nn


class PooledLinearFeatures(nn.Module):
    """FID features ``A · avgpool(x)``: linear in the pixels, so a constant shift c of every pixel moves every
    feature by ``c · A·1`` and leaves the covariance alone — FID is then ``‖c·A·1‖²`` exactly."""

    def __init__(self, generator: torch.Generator, features: int = 6, pool: int = 4) -> None:
        super().__init__()
        self.pool = pool
        self.register_buffer("matrix", torch.randn(features, 3 * pool * pool, generator=generator))
        self.num_features = features

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(images.double(), self.pool).flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pooled(images) @ self.matrix.double().T


def alexnet_features() -> nn.Sequential:
    """torchvision's AlexNet ``features`` layout (the slices torchmetrics' LPIPS cuts), random weights."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))


def inject_lpips(monkeypatch) -> None:
    import torchmetrics.functional.image.lpips as functional
    import torchmetrics.image.lpip as module

    monkeypatch.setattr(module, "_TORCHVISION_AVAILABLE", True)
    monkeypatch.setattr(functional, "_get_tv_model_features", lambda net, pretrained=False: alexnet_features())


class BrightnessReward:
    """ImageReward's ``score(prompt, image)``: the image's mean brightness plus the prompt's length / 100."""

    def score(self, prompt: str, image) -> float:
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).double()
        return float(pixels.mean() / 255 + len(prompt) / 100)


def inject_image_reward(monkeypatch) -> None:
    package = types.ModuleType("ImageReward")
    package.load = lambda name, device="cpu": BrightnessReward()
    monkeypatch.setitem(sys.modules, "ImageReward", package)


def tiny_clip(directory: Path) -> Path:
    """A CLIPModel (random weights, 32-pixel images) and its processor, saved like a Hub download."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789\"'.,-")
    vocabulary = {"<|startoftext|>": 0, "<|endoftext|>": 1, "<unk>": 2}
    for letter in letters:
        vocabulary.setdefault(letter, len(vocabulary))
        vocabulary.setdefault(f"{letter}</w>", len(vocabulary))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocabulary))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    text = {"vocab_size": len(vocabulary), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
            "pad_token_id": 1}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(directory)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(directory)
    return directory
