"""Your own checkpoint: a single-file fine-tune of a model whose other parts (text encoders, VAE, scheduler and
the denoiser's config) come from a base model. The denoiser is the base's transformer or UNet (an SDXL
fine-tune).

The two are assembled into a diffusers directory in svdq's cache — links to the base's components, the
denoiser's config and the file's weights — so every stage, streaming included, reads it as any model and
an export records it like a local directory. A file in diffusers' key names is linked as it is (no copy, no
memory); one in the original release's names goes through diffusers' ``from_single_file`` for the classes
that have it, once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import BadInputError, gist
from ..system.files import file_layout, user_cache
from .streaming import component_config, denoiser_component, empty_model, pipeline_index


def is_single_file(model: str) -> bool:
    return model.endswith(".safetensors") and Path(model).is_file()


def assemble(file: Path, base_dir: Path, base: str) -> Path:
    """The diffusers directory of ``base_dir``'s pipeline with ``file``'s denoiser weights (made once).

    Raises:
        BadInputError: the base has no denoiser, or the file does not fit it (the first mismatched tensor).
    """
    import diffusers
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

    file, base_dir = Path(file).resolve(), Path(base_dir).resolve()
    index = pipeline_index(base_dir)
    component = denoiser_component(index)
    if component is None:
        raise BadInputError(f"--base {base} has no transformer or unet component for {file.name} to replace")
    model_class = getattr(diffusers, index[component][1])
    config = component_config(base_dir, component)
    stat = file.stat()
    key = hashlib.sha256(f"{file}|{stat.st_size}|{stat.st_mtime_ns}|{base_dir}".encode()).hexdigest()[:16]
    target = user_cache() / "single-file" / f"{file.stem}-{key}"
    if (target / "model_index.json").exists():
        return target
    skeleton = empty_model(model_class, config, torch.float32)  # meta tensors: shapes, no memory
    expected = {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".assembling-", dir=target.parent))
    try:
        _link_components(base_dir, index, component, work)
        (work / component).mkdir()
        (work / component / "config.json").write_text(json.dumps(config, indent=2))
        found = _shapes(file)
        if set(found) == set(expected):
            _check_shapes(file, found, expected)
            os.symlink(file, work / component / SAFETENSORS_WEIGHTS_NAME)
        else:
            _convert(file, base_dir, model_class, component, found, expected, work / component)
        os.replace(work, target)  # atomic: a half-assembled directory is never seen
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _link_components(base_dir: Path, index: dict, denoiser: str, work: Path) -> None:
    for name, value in index.items():
        if isinstance(value, list) and name != denoiser and (base_dir / name).exists():
            os.symlink(base_dir / name, work / name)
    (work / "model_index.json").write_text(json.dumps(index, indent=2))


def _shapes(file: Path) -> dict[str, tuple[int, ...]]:
    try:
        return {name: shape for name, (_, shape) in file_layout(file).items()}
    except Exception as error:  # safetensors raises several types for a file that is not one
        raise BadInputError(f"{file} is not a readable safetensors file ({gist(error)})") from None


def _check_shapes(file: Path, found: dict, expected: dict) -> None:
    for name in sorted(expected):
        if found[name] != expected[name]:
            raise BadInputError(f"{file.name} does not fit the base model: {name} is {list(found[name])}, the "
                                f"base's config makes it {list(expected[name])}")


def _convert(file: Path, base_dir: Path, model_class, component: str, found: dict, expected: dict,
             out: Path) -> None:
    """Original key names through diffusers' converter; what fits neither is one line naming a tensor."""
    missing = sorted(set(expected) - set(found))
    mismatch = (f"{file.name} does not fit the base model's {model_class.__name__}: {len(missing)} of its tensors "
                f"are not in the file (first: {missing[0]})")
    if not hasattr(model_class, "from_single_file"):
        raise BadInputError(f"{mismatch}; diffusers converts original key names only for "
                            f"{', '.join(_convertible())}")
    try:
        model = model_class.from_single_file(str(file), config=str(base_dir), subfolder=component,
                                             torch_dtype=torch.bfloat16)
    except Exception as error:  # the converters raise KeyError, ValueError, RuntimeError… for a foreign file
        raise BadInputError(f"{mismatch}, and diffusers could not convert it ({type(error).__name__}: "
                            f"{gist(error)})") from None
    model.save_pretrained(out)


def _convertible() -> list[str]:
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    return sorted(name for name in SINGLE_FILE_LOADABLE_CLASSES if "Transformer" in name or "UNet" in name)

