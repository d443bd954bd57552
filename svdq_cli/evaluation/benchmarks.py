"""What an evaluation generates: the paper's benchmarks with their real images, or any prompt set.

- ``mjhq``: MJHQ-30K (``playgroundai/MJHQ-30K``: ``meta_data.json`` with each image's prompt and category,
  ``mjhq30k_imgs.zip`` holding ``CATEGORY/ID.jpg``);
- ``dci``: the summarized Densely Captioned Images set the SVDQuant paper uses (``mit-han-lab/svdquant-datasets``:
  ``sDCI.yaml`` mapping each image's name to its prompt, ``sDCI.gz`` a tarball of ``NAME.jpg``);
- ``mjhq:DIR`` / ``dci:DIR``: the same files in a local directory (an offline machine);
- anything else is a prompt set as calibration takes them (``builtin:validation``, a file, ``hf:…``), with
  no real images, so no FID.

``--num-samples N`` takes N images by a fixed shuffle of their ids (seed 0), so a larger N keeps a smaller
one's samples and their generated images; the real images are center-cropped to the generated aspect and
resized to the generated size, as FID compares them.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..calibration.prompts import load_prompts
from ..errors import BadInputError, SvdqError
from ..models.resolution import Resolution, dimensions
from ..stages.report_images import pixels
from ..system import online
from ..system.files import atomic_write_bytes


@dataclass(frozen=True)
class Source:
    """A benchmark's files on the Hub."""

    label: str
    repo: str
    prompts_file: str
    images_file: str
    default_samples: int


SOURCES = {
    "mjhq": Source("MJHQ-30K", "playgroundai/MJHQ-30K", "meta_data.json", "mjhq30k_imgs.zip", 5000),
    "dci": Source("sDCI", "mit-han-lab/svdquant-datasets", "sDCI.yaml", "sDCI.gz", 5000),
}


class BenchmarkUnavailable(SvdqError):
    """A benchmark's files could not be fetched (exit 1)."""


@dataclass
class Benchmark:
    """Prompts to generate, with a real image for each when the benchmark has them."""

    name: str
    prompts: list[str]
    ids: list[str]
    real: Callable[[list[int], Resolution], Iterator] | None = None  # (indices, size) → uint8 [3, H, W] each

    @property
    def has_real(self) -> bool:
        return self.real is not None


def load(spec: str, count: int | None, cache: Path) -> Benchmark:
    """The benchmark ``spec`` names, with its first ``count`` samples (a benchmark's default, else all).

    Raises:
        BadInputError: a bad count, a local directory without the files, an unusable prompt set.
        BenchmarkUnavailable: a benchmark's files cannot be fetched from the Hub.
    """
    if count is not None and count < 1:
        raise BadInputError(f"--num-samples must be at least 1, got {count}")
    key, _, local = spec.partition(":")
    if key not in SOURCES:
        prompts = load_prompts(spec, count)
        return Benchmark(spec, prompts, [str(index) for index in range(len(prompts))])
    source = SOURCES[key]
    prompts_path, images_path = (_local_files(source, Path(local)) if local else _hub_files(source, key))
    table = _mjhq_prompts(prompts_path) if key == "mjhq" else _dci_prompts(prompts_path)
    ids = _sample(sorted(table), count or source.default_samples)
    prompts = [table[i][0] for i in ids]
    if key == "mjhq":
        members = [f"{table[i][1]}/{i}.jpg" for i in ids]
        return Benchmark(spec, prompts, ids, lambda indices, size: _zip_images(images_path, members, indices, size))
    extracted = cache / "real" / "dci"
    return Benchmark(spec, prompts, ids, lambda indices, size: _tar_images(images_path, extracted, ids, indices, size))


def _sample(ids: list[str], count: int) -> list[str]:
    shuffled = list(ids)
    random.Random(0).shuffle(shuffled)
    return sorted(shuffled[:count])


def _local_files(source: Source, directory: Path) -> tuple[Path, Path]:
    paths = directory / source.prompts_file, directory / source.images_file
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise BadInputError(f"{directory} does not hold {source.label}'s {' and '.join(missing)}")
    return paths


def _hub_files(source: Source, key: str) -> tuple[Path, Path]:
    from huggingface_hub import hf_hub_download

    paths = []
    for filename in (source.prompts_file, source.images_file):
        try:
            paths.append(Path(hf_hub_download(source.repo, filename, repo_type="dataset",
                                              local_files_only=not online.hub_reachable())))
        except Exception as error:  # offline, gated, moved: huggingface_hub has many error types
            raise BenchmarkUnavailable(
                f"cannot fetch {source.label}'s {filename} from {source.repo} ({type(error).__name__}); download "
                f"it with `hf download {source.repo} {source.prompts_file} {source.images_file} --repo-type dataset "
                f"--local-dir DIR` and pass --benchmark {key}:DIR") from None
    return paths[0], paths[1]


def _mjhq_prompts(path: Path) -> dict[str, tuple[str, str]]:
    """id → (prompt, category)."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        return {str(key): (str(value["prompt"]), str(value["category"])) for key, value in meta.items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise BadInputError(f"{path} is not MJHQ-30K's meta_data.json ({type(error).__name__})") from None


def _dci_prompts(path: Path) -> dict[str, tuple[str, str]]:
    """name → (prompt, "")."""
    import yaml

    try:
        meta = yaml.safe_load(path.read_text(encoding="utf-8"))
        return {str(key): (str(value), "") for key, value in meta.items()}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError) as error:
        raise BadInputError(f"{path} is not sDCI's prompt file ({type(error).__name__})") from None


def fitted(data: bytes, size: Resolution):
    """An image file's pixels center-cropped to the aspect of ``size`` and resized to it, as a uint8 [3, H, W]."""
    from PIL import Image

    width, height = dimensions(size)
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        scale = min(image.width / width, image.height / height)  # the largest crop of the generated aspect
        crop_width, crop_height = round(width * scale), round(height * scale)
        left, top = (image.width - crop_width) // 2, (image.height - crop_height) // 2
        box = (left, top, left + crop_width, top + crop_height)
        return pixels(image.crop(box).resize((width, height), Image.Resampling.BICUBIC))


def _zip_images(path: Path, members: list[str], indices: list[int], size: Resolution) -> Iterator:
    with zipfile.ZipFile(path) as archive:
        for index in indices:
            try:
                data = archive.read(members[index])
            except KeyError:
                raise BadInputError(f"{path.name} has no real image {members[index]}") from None
            yield fitted(data, size)


def _tar_images(path: Path, directory: Path, ids: list[str], indices: list[int], size: Resolution) -> Iterator:
    """sDCI's images, extracted once into ``directory`` (a tarball has no random access): one pass over it for
    every image not there yet."""
    wanted = {f"{ids[index]}.jpg" for index in indices}
    missing = {name for name in wanted if not (directory / name).is_file()}
    if missing:
        with tarfile.open(path) as archive:
            for member in archive:
                name = Path(member.name).name
                if member.isfile() and name in missing:
                    atomic_write_bytes(directory / name, archive.extractfile(member).read())
                    missing.discard(name)
                    if not missing:
                        break
    if missing:
        raise BadInputError(f"{path.name} has no real image {sorted(missing)[0]}")
    for index in indices:
        yield fitted((directory / f"{ids[index]}.jpg").read_bytes(), size)
