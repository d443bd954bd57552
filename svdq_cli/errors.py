"""svdq's exceptions. Each carries the exit code the CLI maps it to (DESIGN.md §5)."""

import re


class SvdqError(Exception):
    """A failure svdq can explain in one line; exit code 1 (runtime failure)."""

    exit_code = 1


class BadInputError(SvdqError, ValueError):
    """Bad usage or bad input (shapes, values, files, config); exit code 2."""

    exit_code = 2


class QualityGateError(SvdqError):
    """A validation gate (minimum PSNR, …) failed; exit code 3."""

    exit_code = 3


_LITERAL = re.compile(r"[\[{(<][^\[\]{}()<>]*[\]})>]")  # an innermost bracketed run: a list, set, dict, repr


def gist(error: object, limit: int = 300) -> str:
    """A library's error (or its text) as one line of at most ``limit`` characters that still names the cause.

    Its first line, whitespace collapsed; while too long, the longest bracketed literal (the list of keys or
    components a library prints whole) is cut to its start; then, if still too long, the text is cut at a
    word. ``expected {'scheduler', 'text_encoder', …}, but only {'vae', …} were passed`` keeps its sense
    where a plain cut at 300 characters ends mid-word.
    """
    text = " ".join((str(error).strip().splitlines() or [""])[0].split()) or type(error).__name__
    while len(text) > limit:
        literals = [m for m in _LITERAL.finditer(text) if m.end() - m.start() > 24]
        if not literals:
            break
        longest = max(literals, key=lambda m: m.end() - m.start())
        head = text[longest.start() + 1:longest.start() + 21]
        cut = max(head.rfind(","), head.rfind(" "))  # keep whole items
        head = (head[:cut] if cut > 0 else head).rstrip(", ")
        shorter = f"{text[:longest.start() + 1]}{head}, …{text[longest.end() - 1:]}"
        if len(shorter) >= len(text):  # every literal already cut to its start: cut at a word below
            break
        text = shorter
    if len(text) > limit:
        text = text[:limit - 2].rsplit(" ", 1)[0].rstrip(",;:") + " …"
    return text


def missing_library(error: Exception) -> str | None:
    """The library to install, when ``error`` says one is missing: transformers and diffusers name it
    ("Qwen2VLVideoProcessor requires the Torchvision library"), Python does (a ModuleNotFoundError's name), and
    so does the NameError of a library diffusers imports only when installed (ftfy)."""
    needed = re.search(r"requires the (\w+) library", str(error))
    if needed:
        return needed[1].lower()
    return getattr(error, "name", None) if isinstance(error, (ImportError, NameError)) else None
