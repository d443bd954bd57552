"""Prompt sets: the built-in ones, text/JSON/CSV files, or a Hub dataset (``hf:org/name[:split[:column]]``).

An image-editing prompt carries a reference image: a JSON object ``{"prompt": …, "image": PATH}`` or a CSV
``image`` column, the path relative to the prompt file. Such a prompt is a :class:`Prompt`, a ``str`` that
also knows its image, so every stage passes it on unchanged; caches key it by :func:`identity`.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import BadInputError
from ..system import online
from ..system.resources import data_dir

BUILTIN = {"builtin:calibration": "calibration.txt", "builtin:validation": "validation.txt"}
MAX_PROMPT_CHARACTERS = 4000


class Prompt(str):
    """A prompt's text with the reference image it edits (an absolute path) and that file's sha256."""

    image: str
    image_sha256: str

    def __new__(cls, text: str, image: Path) -> Prompt:
        prompt = super().__new__(cls, text)
        prompt.image, prompt.image_sha256 = str(image), _image_digest(image)
        return prompt

    def reference_image(self, width: int, height: int) -> Image.Image:
        """The reference image in RGB, resized to the generation's size."""
        with Image.open(self.image) as image:
            return image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)


def identity(prompt: str):
    """What a cache keys a prompt by: its text, with its reference image's content when it has one."""
    return [str(prompt), prompt.image_sha256] if isinstance(prompt, Prompt) else str(prompt)


def load_prompts(source: str, count: int | None = None) -> list[str]:
    """The first ``count`` prompts of ``source`` (all when None).

    Raises:
        BadInputError: unknown built-in set, unreadable or empty file, unusable dataset.
    """
    if source in BUILTIN:
        prompts = _read_lines(data_dir("calibration_prompts") / BUILTIN[source])
    elif source.startswith("hf:"):
        prompts = _from_dataset(source)
    elif source.startswith("builtin:"):
        raise BadInputError(f"unknown prompt set {source!r} (built in: {', '.join(BUILTIN)})")
    else:
        prompts = _from_file(Path(source))
    prompts = [p if isinstance(p, Prompt) else p.strip() for p in prompts if p and p.strip()]  # Prompt: stripped
    if not prompts:
        raise BadInputError(f"prompt source {source} holds no prompts")
    for number, prompt in enumerate(prompts, 1):
        if len(prompt) > MAX_PROMPT_CHARACTERS:
            raise BadInputError(f"prompt {number} of {source} is {len(prompt)} characters long (at most "
                                f"{MAX_PROMPT_CHARACTERS}: the text encoders read a few hundred tokens)")
    if count is not None:
        if count < 1:
            raise BadInputError(f"the number of prompts must be at least 1, got {count}")
        prompts = prompts[:count]
    return prompts


def _image_digest(path: Path) -> str:
    """The sha256 of a readable image file.

    Raises:
        BadInputError: missing, unreadable, or not an image.
    """
    try:
        data = Path(path).read_bytes()
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, SyntaxError, ValueError):  # before OSError: PIL's error is one
        raise BadInputError(f"reference image {path} is not an image PIL can read") from None
    except OSError as error:
        raise BadInputError(f"reference image {path} cannot be read ({getattr(error, 'strerror', None) or error})"
                            ) from None
    return hashlib.sha256(data).hexdigest()


def prompt_seed(prompt: str, base_seed: int) -> int:
    """A seed derived from the prompt text, so a prompt gets the same noise wherever it appears."""
    return int.from_bytes(hashlib.sha256(f"{base_seed}:{prompt}".encode()).digest()[:4], "little")


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise BadInputError(f"cannot read prompt file {path}: {getattr(error, 'strerror', None) or error}") from None


def _from_file(path: Path) -> list[str]:
    if not path.is_file():
        raise BadInputError(f"prompt file {path} does not exist")
    text = "\n".join(_read_lines(path))
    if path.suffix.lower() == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise BadInputError(f"prompt file {path} is not valid JSON ({error.msg}, line {error.lineno})") from None
        except RecursionError:  # the decoder recurses once per level of nesting
            raise BadInputError(f"prompt file {path} nests its JSON thousands of levels deep; a prompt file is a "
                                "list of strings (or of objects with a \"prompt\")") from None
        if not isinstance(items, list):
            raise BadInputError(f"prompt file {path} must hold a JSON list")
        return [_item(item, path.parent) for item in items if isinstance(item, (str, dict))]
    if path.suffix.lower() == ".csv":
        try:
            rows = list(csv.DictReader(text.splitlines()))
        except csv.Error as error:
            raise BadInputError(f"CSV prompt file {path} is malformed ({error})") from None
        if rows and "prompt" not in rows[0]:
            raise BadInputError(f"CSV prompt file {path} has no 'prompt' column")
        return [_item(row, path.parent) for row in rows]
    return text.splitlines()


def _item(item, directory: Path):
    """A JSON item or CSV row: a string, or an object with a prompt and maybe a reference image."""
    if not isinstance(item, dict):
        return item
    text, image = item.get("prompt"), item.get("image")
    if not isinstance(text, str):
        return None  # no prompt: skipped like an empty line
    if image in (None, ""):
        return text
    if not isinstance(image, str):
        raise BadInputError(f"the image of prompt {text[:40]!r} must be a path, got {type(image).__name__}")
    return Prompt(text.strip(), (directory / image).resolve())  # its image read once, here


def _from_dataset(source: str) -> list[str]:
    name, _, rest = source[3:].partition(":")
    split, _, column = rest.partition(":")
    if not Path(name).exists() and not online.hub_reachable():
        raise BadInputError(f"cannot reach the Hugging Face Hub to load dataset {name!r} (offline?); pass a local "
                            "prompt file (.txt, .json, .csv) instead")
    try:
        import datasets

        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as error:  # datasets raises many types: offline, missing, bad split
        raise BadInputError(
            f"could not load dataset {name!r} ({type(error).__name__}); check the name or pass a local prompt file"
        ) from None
    column = column or ("prompt" if "prompt" in dataset.column_names else dataset.column_names[0])
    if column not in dataset.column_names:
        raise BadInputError(f"dataset {name} has no column {column!r} (columns: {', '.join(dataset.column_names)})")
    return [str(value) for value in dataset[column]]
