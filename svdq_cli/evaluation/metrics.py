"""The evaluation's metrics, from the field's libraries: torchmetrics (FID, LPIPS, CLIP score, PSNR, SSIM) and
ImageReward's own package.

Images are uint8 ``[N, 3, H, W]`` tensors, as read back from the PNGs the evaluation writes, so every figure is
the one a reader recomputes from those files. Each metric's network is loaded (and downloaded on first use,
into the library's standard cache) before any image is generated: a missing package or weight file is one line
naming what to install or where to put a local copy (:class:`MetricUnavailable`), never a failure after hours of
generation.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

from ..errors import BadInputError, SvdqError
from ..stages.report_images import picture
from ..system import online

ALL = ("fid", "image-reward", "lpips", "psnr", "ssim", "clip")
NO_DOWNLOAD = ("psnr", "ssim")  # computed from the pixels alone
AGAINST_16BIT = ("lpips", "psnr", "ssim")  # pairs each image with the 16-bit model's at the same seed
AGAINST_REAL = ("fid",)  # needs the benchmark's ground-truth images
HIGHER_IS_BETTER = {"fid": False, "image-reward": True, "lpips": False, "psnr": True, "ssim": True, "clip": True}
LABELS = {"fid": "FID vs real", "image-reward": "ImageReward", "lpips": "LPIPS vs 16-bit",
          "psnr": "PSNR vs 16-bit (dB)", "ssim": "SSIM vs 16-bit", "clip": "CLIP score"}
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
INCEPTION_FEATURES = 2048  # torch-fidelity's pool3 features, the standard FID
EXTRA = "pip install 'svdq[eval]'"


class MetricUnavailable(SvdqError):
    """A metric's package or weights are not on this machine (exit 1)."""


def parse(names: str | None) -> tuple[list[str], bool]:
    """The metrics named in ``--metrics`` (comma-separated), and whether the user named them: without a list,
    every metric is tried and those that cannot load are skipped with a line each.

    Raises:
        BadInputError: an unknown name, or an empty list.
    """
    if names is None:
        return list(ALL), False
    chosen = [name.strip().lower() for name in names.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in ALL]
    if unknown or not chosen:
        raise BadInputError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ALL)}")
    return list(dict.fromkeys(chosen)), True


def inception() -> int | torch.nn.Module:
    """FID's feature network: the standard Inception (torchmetrics loads it through torch-fidelity), or a
    module mapping float images in [0, 1] to ``[N, D]`` features (how the tests stand in for it)."""
    return INCEPTION_FEATURES


def load_fid(device: str):
    from torchmetrics.image.fid import FrechetInceptionDistance

    try:
        return FrechetInceptionDistance(feature=inception(), normalize=True, reset_real_features=False).to(device)
    except (ModuleNotFoundError, ImportError):
        raise MetricUnavailable(f"FID needs torch-fidelity ({EXTRA})") from None
    except Exception as error:  # its Inception weights come from GitHub on first use
        raise MetricUnavailable(
            f"FID cannot load its Inception weights ({type(error).__name__}); on an offline machine copy "
            "pt_inception-2015-12-05-6726825d.pth into $TORCH_HOME/hub/checkpoints (torch.hub.get_dir())") from None


def load_lpips(device: str):
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    try:
        return LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).to(device)
    except ModuleNotFoundError:
        raise MetricUnavailable(f"LPIPS needs torchvision ({EXTRA})") from None
    except Exception as error:  # torchvision fetches AlexNet's ImageNet weights on first use
        raise MetricUnavailable(
            f"LPIPS cannot load AlexNet's weights ({type(error).__name__}); on an offline machine copy "
            "alexnet-owt-7be5be79.pth into $TORCH_HOME/hub/checkpoints (torch.hub.get_dir())") from None


@dataclass
class ClipScorer:
    """CLIP score per (prompt, image): ``100 · max(cos(image embedding, text embedding), 0)``, the definition
    torchmetrics' CLIPScore uses (whose own code reads transformers 4's return types, not 5's)."""

    model: object
    processor: object
    device: str

    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        inputs = self.processor(text=[str(p) for p in prompts], images=list(images.cpu()), return_tensors="pt",
                                padding=True, truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings)
        with torch.no_grad():
            output = self.model(**{key: value.to(self.device) for key, value in inputs.items()})
        image = nn.functional.normalize(output.image_embeds.double(), dim=-1)
        text = nn.functional.normalize(output.text_embeds.double(), dim=-1)
        return (100 * (image * text).sum(-1)).clamp(min=0).cpu()


def load_clip(device: str, model: str = DEFAULT_CLIP_MODEL) -> ClipScorer:
    try:
        from transformers import CLIPModel, CLIPProcessor

        local = not online.hub_reachable()
        network = CLIPModel.from_pretrained(model, local_files_only=local).to(device).eval()
        return ClipScorer(network, CLIPProcessor.from_pretrained(model, local_files_only=local), device)
    except Exception as error:  # transformers raises OSError, ValueError… for a missing or partial copy
        raise MetricUnavailable(
            f"CLIP score cannot load {model} ({type(error).__name__}); download it with `hf download {model}` "
            "or pass --clip-model DIR (a local CLIPModel with its processor)") from None


@dataclass
class ImageRewardScorer:
    """ImageReward's model: a score per (prompt, image)."""

    model: object

    def __call__(self, prompts: Sequence[str], images: torch.Tensor) -> torch.Tensor:
        scores = []
        for prompt, image in zip(prompts, images, strict=True):
            with torch.no_grad():
                scores.append(float(self.model.score(str(prompt), picture(image))))
        return torch.tensor(scores, dtype=torch.float64)


def load_image_reward(device: str) -> ImageRewardScorer:
    try:
        import ImageReward
    except ImportError:
        raise MetricUnavailable(f"ImageReward needs the image-reward package ({EXTRA})") from None
    try:
        return ImageRewardScorer(ImageReward.load("ImageReward-v1.0", device=device))
    except Exception as error:  # its weights come from the Hub (THUDM/ImageReward) on first use
        raise MetricUnavailable(
            f"ImageReward cannot load its weights ({type(error).__name__}); download them with "
            "`hf download THUDM/ImageReward` on a machine with the Hub, then copy the cache") from None


class _Tally:
    """One method's running sums, and its own FID and LPIPS accumulators: copies of the suite's (FID's with
    the real images' statistics) that share their feature networks, so a method costs no network."""

    def __init__(self, networks: dict[str, object]) -> None:
        self.sums = dict.fromkeys(("psnr", "ssim", "image-reward", "clip"), 0.0)
        self.count, self.paired = 0, True
        self.networks = {name: _fresh_copy(network) for name, network in networks.items() if name in ("lpips", "fid")}


def _fresh_copy(metric):
    """A torchmetrics metric with its accumulated state copied and then reset (FID keeps its real side:
    reset_real_features is False), its submodules — the feature networks — shared, not copied."""
    clone = copy.deepcopy(metric, {id(child): child for child in metric.children()})
    clone.reset()
    return clone


@dataclass
class Suite:
    """The loaded metric networks, by name (PSNR and SSIM need none)."""

    names: list[str]
    networks: dict[str, object]
    device: str
    skipped: dict[str, str] = field(default_factory=dict)  # metric → why it is not computed
    has_real: bool = False

    def set_real(self, real: Iterable[torch.Tensor]) -> None:
        """FID's statistics of the benchmark's real images (uint8 batches), computed once for every method."""
        if "fid" in self.networks:
            for part in real:
                self.networks["fid"].update(as_float(part).to(self.device), real=True)
            self.has_real = True

    def scores(self, batches: Iterable[tuple[torch.Tensor, Sequence[str], torch.Tensor | None]]
               ) -> dict[str, float | None]:
        """Every metric of one method's images, given as batches ``(images, prompts, 16-bit images or None)``;
        see :meth:`scores_by_method`."""
        return self.scores_by_method((prompts, {"": (images, reference)})
                                     for images, prompts, reference in batches)[""]

    def scores_by_method(self, batches: Iterable[tuple[Sequence[str], dict[str, tuple[torch.Tensor,
                                                                                       torch.Tensor | None]]]]
                         ) -> dict[str, dict[str, float | None]]:
        """Every metric of several methods' images, given batch by batch as ``(prompts, {method: (images,
        16-bit images or None)})``, so that a batch of the 16-bit images is read once for every method and no
        more than a batch is in memory; None where a metric does not apply (no 16-bit pair for the 16-bit model
        itself, no real images for FID)."""
        tallies: dict[str, _Tally] = {}
        for prompts, pairs in batches:
            for method, (images, reference) in pairs.items():
                if method not in tallies:
                    tallies[method] = _Tally(self.networks)
                self._add(tallies[method], images, prompts, reference)
        return {method: self._values(tally) for method, tally in tallies.items()}

    def _add(self, tally: _Tally, images: torch.Tensor, prompts: Sequence[str], reference: torch.Tensor | None):
        tally.count += len(images)
        tally.paired = tally.paired and reference is not None
        for name in self.names:
            if not self._applies(name, tally.paired):
                continue
            if name == "psnr":
                tally.sums[name] += float(psnr_per_image(images, reference).sum())
            elif name == "ssim":
                tally.sums[name] += float(ssim_per_image(images, reference, self.device).sum())
            elif name in ("image-reward", "clip"):  # a score per (prompt, image)
                tally.sums[name] += float(self.networks[name](prompts, images).sum())
            elif name == "lpips":
                tally.networks[name].update(as_float(images).to(self.device), as_float(reference).to(self.device))
            else:  # fid
                tally.networks[name].update(as_float(images).to(self.device), real=False)

    def _values(self, tally: _Tally) -> dict[str, float | None]:
        values: dict[str, float | None] = {}
        for name in self.names:
            if not tally.count or not self._applies(name, tally.paired):
                values[name] = None
            elif name in tally.sums:
                values[name] = tally.sums[name] / tally.count
            else:
                values[name] = float(tally.networks[name].compute())
        return values

    def _applies(self, name: str, paired: bool) -> bool:
        """Whether metric ``name`` has what it compares with: 16-bit pairs, or the real images' statistics."""
        return not (name in AGAINST_16BIT and not paired or name in AGAINST_REAL and not self.has_real)


LOADERS: dict[str, Callable[..., object]] = {"fid": load_fid, "lpips": load_lpips, "image-reward": load_image_reward,
                                             "clip": load_clip}  # each takes the device (CLIP: and a model)


def load(names: list[str], explicit: bool, device: str, clip_model: str,
         say: Callable[[str], None]) -> Suite:
    """Load every metric's network now. A metric named explicitly that cannot load stops the evaluation (its
    :class:`MetricUnavailable`); without an explicit list it is skipped, with its line said.

    Raises:
        MetricUnavailable: an explicitly named metric that cannot load.
    """
    kept, networks, skipped = [], {}, {}
    loaders = {**LOADERS, "clip": partial(load_clip, model=clip_model)}
    for name in names:
        if name in NO_DOWNLOAD:
            kept.append(name)
            continue
        try:
            networks[name] = loaders[name](device)
        except MetricUnavailable as missing:
            if explicit:
                raise
            say(f"{name}: skipped: {missing}")
            skipped[name] = str(missing)
            continue
        kept.append(name)
    return Suite(kept, networks, device, skipped)


BATCH = 16  # images per network call: bounded memory at any resolution


def as_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels as floats in [0, 1] (float64 for the pixel metrics: exact for every 8-bit value)."""
    return images.to(dtype) / 255.0


def psnr_per_image(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each image's PSNR in dB against its 16-bit pair (data range 1; ∞ for an identical pair, which makes the
    mean ∞)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(as_float(images, torch.float64), as_float(reference, torch.float64), data_range=1.0,
                                   reduction="none", dim=(1, 2, 3))


def ssim_per_image(images: torch.Tensor, reference: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """Each image's SSIM against its 16-bit pair (Gaussian window 11, σ 1.5: torchmetrics' defaults), one image
    at a time in float32: torchmetrics convolves five images per input, and a CPU convolution in float64 unfolds
    its 11×11 window (at 1024 px, 80 GB for a batch of 16)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return torch.cat([structural_similarity_index_measure(as_float(a[None]).to(device), as_float(b[None]).to(device),
                                                          data_range=1.0, reduction="none").double().cpu()
                      for a, b in zip(images, reference, strict=True)])


def json_value(value: float | None) -> float | str | None:
    """A figure as strict JSON holds it: ∞ (identical images' PSNR) as the string "inf"."""
    return "inf" if value is not None and math.isinf(value) else value
