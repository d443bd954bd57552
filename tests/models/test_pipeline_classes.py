"""`svdq targets` over the installed diffusers' pipeline classes: every class that the components of a tiny
family svdq tests (the six presets and the new families of :mod:`tests.models.new_families`) can make —
FluxImg2ImgPipeline from tiny-flux's parts, StableDiffusionXLPAGPipeline from the tiny SDXL's — is saved as a
user's directory would be and given to `svdq targets` (with a prompt carrying a reference image when the
call takes an image). Each either works (blocks of linears found, the same linears as its family's own
pipeline) or is refused in one line with exit 2 that names the class: never a traceback, an unexpected error,
or a silent wrong answer."""

from __future__ import annotations

import inspect
import json
from functools import cache

import pytest
from PIL import Image

from svdq_cli.models import dit, flux, pixart, sana, sd3
from tests.conftest import svdq
from tests.models.new_families import BUILDERS, UNET_BUILDERS, VIDEO_BUILDERS

FAMILIES = {"FluxPipeline": flux.build_tiny, "StableDiffusion3Pipeline": sd3.build_tiny,
            "SanaPipeline": sana.build_tiny,
            "PixArtSigmaPipeline": pixart.build_tiny, "DiTPipeline": dit.build_tiny,
            **BUILDERS, **UNET_BUILDERS, **VIDEO_BUILDERS}


def _pipeline_classes() -> dict[str, type]:
    import diffusers

    classes = {}
    for name in dir(diffusers):
        if name.endswith("Pipeline"):
            try:
                cls = getattr(diffusers, name)
            except (ImportError, AttributeError):  # a class whose optional dependency is missing
                continue
            if isinstance(cls, type) and issubclass(cls, diffusers.DiffusionPipeline):
                classes[name] = cls
    return classes


def _denoiser(cls: type) -> tuple[str, str] | None:
    """The denoiser parameter of a pipeline class's ``__init__`` and the class it is annotated with."""
    parameters = inspect.signature(cls.__init__).parameters
    name = next((p for p in ("transformer", "unet") if p in parameters), None)
    return None if name is None else (name, str(parameters[name].annotation))


def _required(cls: type) -> set[str]:
    return {p for p, spec in inspect.signature(cls.__init__).parameters.items()
            if p != "self" and spec.default is spec.empty and spec.kind is spec.POSITIONAL_OR_KEYWORD}


def _kin() -> dict[str, str]:
    """``{pipeline class: family}``: the installed classes a family's components can make — its denoiser
    parameter takes the family's denoiser class and it requires no component the family lacks. A family is its
    own kin first."""
    classes = _pipeline_classes()
    kin = {name: name for name in FAMILIES if name in classes}
    for family in FAMILIES:
        component, annotation = _denoiser(classes[family])
        denoiser_class = annotation.replace("Optional[", "").split("|")[0].strip(" []'\"").split(".")[-1]
        for name, cls in sorted(classes.items()):
            found = _denoiser(cls)
            if name in kin or found is None or found[0] != component or denoiser_class not in found[1]:
                continue
            if _required(cls) <= _required(classes[family]):
                kin[name] = family
    return kin


KIN = _kin()


@cache
def _components(family: str) -> dict:
    return FAMILIES[family]().components


@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    """Each class saved once per worker, from its family's components."""
    root, made = tmp_path_factory.mktemp("pipeline-classes"), {}

    def directory(name: str):
        if name not in made:
            cls = _pipeline_classes()[name]
            parameters = inspect.signature(cls.__init__).parameters
            components = {k: v for k, v in _components(KIN[name]).items() if k in parameters}
            cls(**components).save_pretrained(root / name)
            made[name] = root / name
        return made[name]

    return directory


@pytest.fixture(scope="module")
def image_prompts(tmp_path_factory):
    """A prompt file whose prompt carries a reference image, for the classes whose call takes one."""
    root = tmp_path_factory.mktemp("image-prompts")
    Image.new("RGB", (64, 64), (120, 90, 200)).save(root / "reference.png")
    (root / "prompts.json").write_text(json.dumps([{"prompt": "the same scene at night", "image": "reference.png"}]))
    return root / "prompts.json"


@cache
def _targets(directory, prompts=None) -> tuple[int, str, str]:
    return svdq("targets", directory, "--json", *(("--prompts", prompts) if prompts else ()))


def test_the_sweep_covers_every_family_and_its_kin():
    assert set(FAMILIES) <= set(KIN)
    assert len(KIN) >= 3 * len(FAMILIES)  # img2img, inpaint, PAG, control… variants of each family


@pytest.mark.parametrize("name", sorted(KIN))
def test_targets_of_every_installed_pipeline_class_a_family_makes(name, directories, image_prompts):
    import diffusers

    takes_image = "image" in inspect.signature(getattr(diffusers, name).__call__).parameters
    code, stdout, stderr = _targets(directories(name), image_prompts if takes_image else None)
    assert "Traceback" not in stderr
    if code == 0:
        result = json.loads(stdout)
        lists = {name: entry for name, entry in result["block_lists"].items() if entry["first"] is not None}
        assert lists and all(entry["blocks"] >= 1 for entry in lists.values())
        assert sum(entry["quantized"] + entry["weight_only"] for entry in lists.values()) >= 1  # DiT's VQ: weights
        own = json.loads(_targets(directories(KIN[name]))[1])
        assert [layer["name"] for layer in result["layers"]] == [layer["name"] for layer in own["layers"]]
        return
    assert name not in FAMILIES, stderr  # a family's own class always works
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert code == 2 and len(errors) == 1 and name in errors[0], stderr
