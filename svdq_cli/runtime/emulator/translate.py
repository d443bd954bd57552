"""Source translation of a CUDA file for the CPU emulator: the two constructs host C++ cannot take as they are.

- ``asm volatile("ptx" : outputs : inputs);`` becomes ``::svdq_emu::ptx("ptx", {outputs}, {inputs});``. The
  PTX text itself is kept and interpreted at run time, so a wrong type suffix, shape or operand order in the
  string is exercised, not replaced.
- ``__shared__ T name[...];`` becomes a reference into the running block's shared-memory arena (and
  ``extern __shared__ T name[];`` a pointer to its dynamic region), so shared memory is per block, sized,
  poisoned and addressable by ``__cvta_generic_to_shared`` like the GPU's.

Everything else is left alone, and every rewrite keeps the line count, so compiler errors point at the
``.cu`` file's own lines. Constructs the rewriter does not understand are errors, never guesses.
"""

from __future__ import annotations

import re

_CONSTRAINTS = {"r": 4, "l": 8, "h": 2, "f": 4, "d": 8, "n": None}


class TranslationError(ValueError):
    """A construct of the CUDA source the emulator cannot translate."""


def _skip_literal(source: str, index: int) -> int:
    """Index just past the string or character literal starting at ``index``."""
    quote = source[index]
    index += 1
    while source[index] != quote:
        index += 2 if source[index] == "\\" else 1
    return index + 1


def _code_positions(source: str):
    """Yield the start of every identifier outside comments and literals, with the identifier."""
    index, length = 0, len(source)
    while index < length:
        ch = source[index]
        if source.startswith("//", index):
            index = source.find("\n", index)
            index = length if index < 0 else index
        elif source.startswith("/*", index):
            index = source.index("*/", index) + 2
        elif ch in "\"'":
            index = _skip_literal(source, index)
        elif ch.isalpha() or ch == "_":
            end = index
            while end < length and (source[end].isalnum() or source[end] == "_"):
                end += 1
            yield index, source[index:end]
            index = end
        else:
            index += 1


def _matching(source: str, index: int, opening: str = "(", closing: str = ")") -> int:
    """Index of the bracket closing the one at ``index``."""
    depth = 0
    while True:
        ch = source[index]
        if ch in "\"'":
            index = _skip_literal(source, index)
            continue
        if ch == opening:
            depth += 1
        elif ch == closing:
            depth -= 1
            if depth == 0:
                return index
        index += 1


def _split_top(text: str, separator: str) -> list[str]:
    """Split at ``separator`` outside literals and brackets."""
    parts, depth, start, index = [], 0, 0, 0
    while index < len(text):
        ch = text[index]
        if ch in "\"'":
            index = _skip_literal(text, index)
            continue
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == separator and depth == 0:
            parts.append(text[start:index])
            start = index + 1
        index += 1
    parts.append(text[start:])
    return parts


def _operand(text: str, output: bool) -> str:
    match = re.fullmatch(r'\s*"([=+&]*)([a-z])"\s*\((.*)\)\s*', text, re.S)
    if not match:
        raise TranslationError(f"cannot read the asm operand {text.strip()!r}")
    modifier, constraint, expression = match.groups()
    if constraint not in _CONSTRAINTS:
        raise TranslationError(f"asm constraint {constraint!r} is not supported by the emulator")
    if not output:
        return f"::svdq_emu::in({expression})"
    return f"::svdq_emu::{'inout' if '+' in modifier else 'out'}({expression})"


def _rewrite_asm(body: str) -> str:
    sections = _split_top(body.replace("\\\n", " "), ":") + ["", ""]
    template, outputs, inputs = sections[0].strip(), sections[1], sections[2]
    if not re.search(r'"[^"]*\S[^"]*"', template):  # asm volatile("" ::: "memory"): a compiler barrier only
        return "((void)0)"
    outs = [_operand(o, True) for o in _split_top(outputs, ",") if o.strip()]
    ins = [_operand(i, False) for i in _split_top(inputs, ",") if i.strip()]
    return f"::svdq_emu::ptx({template}, {{{', '.join(outs)}}}, {{{', '.join(ins)}}})"


_SHARED = re.compile(
    r"^(?P<extern>extern\s+)?(?:static\s+)?__shared__\s+(?:__align__\s*\(\s*(?P<align1>\d+)\s*\)\s+)?"
    r"(?:alignas\s*\(\s*(?P<align2>\d+)\s*\)\s+)?(?P<type>[\w:<>,\s]+?)\s+(?P<name>\w+)\s*(?P<dims>(?:\[[^\]]*\]\s*)*)$",
    re.S,
)


def _rewrite_shared(declaration: str, serial: int) -> str:
    match = _SHARED.match(declaration.strip())
    if not match:
        raise TranslationError(f"cannot translate the shared-memory declaration {declaration.strip()!r} "
                               "(one variable per declaration, no initializer)")
    align = int(match["align1"] or match["align2"] or 0)
    kind, name, dims = match["type"].strip(), match["name"], match["dims"].strip()
    if match["extern"]:
        if dims.replace(" ", "") != "[]":
            raise TranslationError(f"extern __shared__ {name} must be an array of unknown size")
        return f"{kind}* {name} = static_cast<{kind}*>(::svdq_emu::shared_dynamic({align or 16}))"
    alias, tag = f"svdq_emu_shared_type_{serial}", f"svdq_emu_shared_tag_{serial}"
    return (f"using {alias} = {kind}{dims}; static const char {tag} = 0; "
            f"{alias}& {name} = *static_cast<{alias}*>(::svdq_emu::shared_static(&{tag}, sizeof({alias}), "
            f"{align} > alignof({alias}) ? {align} : alignof({alias})))")


def translate(source: str) -> str:
    """The CUDA ``source`` with its asm statements and __shared__ declarations rewritten (lines kept)."""
    pieces, position, serial = [], 0, 0
    for start, word in _code_positions(source):
        if start < position:
            continue
        if word in ("asm", "__asm__"):
            match = re.compile(r"(?:asm|__asm__)\s*(?:volatile|__volatile__)?\s*\(").match(source, start)
            if not match:
                continue
            close = _matching(source, match.end() - 1)
            replacement = _rewrite_asm(source[match.end() : close])
        elif word == "__shared__":
            qualifiers = re.search(r"(?:\b(?:extern|static)\s+)*$", source[position:start])
            begin = position + qualifiers.start()
            close = source.index(";", start) - 1
            serial += 1
            replacement = _rewrite_shared(source[begin : close + 1].replace("\\\n", " "), serial)
            start = begin
        else:
            continue
        original = source[start : close + 1]
        # Inside a macro the lines end in backslashes, and so must the replacement's.
        newline = " \\\n" if "\\\n" in original else "\n"
        pieces.append(source[position:start])
        pieces.append(replacement.replace("\n", " ") + newline * original.count("\n"))
        position = close + 1
    pieces.append(source[position:])
    return "".join(pieces)


def kernel_parameters(source: str, kernel: str) -> list[str]:
    """Parameter names of ``__global__`` function ``kernel`` (for messages); empty when not found."""
    match = re.search(rf"__global__[^;{{]*?\b{re.escape(kernel)}\s*\(", source)
    if not match:
        return []
    close = _matching(source, match.end() - 1)
    body = re.sub(r"//[^\n]*|/\*.*?\*/", "", source[match.end() : close], flags=re.S)
    names = []
    for parameter in _split_top(body, ","):
        words = re.findall(r"\w+", parameter.split("=")[0])
        if words:
            names.append(words[-1])
    return names
