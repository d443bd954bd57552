"""Progress and talk on stderr: a rich progress bar on a terminal, plain line-buffered lines otherwise (CI
logs stay readable). Results go to stdout, never through here."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)
_rank_label = [""]  # "rank r/N" in a distributed run: every line says which rank it comes from


def set_rank_label(label: str) -> None:
    """Prefix every line with ``label`` and draw no bars (several ranks share one terminal)."""
    _rank_label[0] = label


def _bars() -> bool:
    return console.is_terminal and not _rank_label[0]


def say(message: str) -> None:
    if _rank_label[0]:
        message = f"[{_rank_label[0]}] {message}"
    console.print(message, highlight=False) if _bars() else print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    say(f"[yellow]warning:[/yellow] {message}" if _bars() else f"warning: {message}")


@contextmanager
def task(description: str, total: int):
    """Yields ``advance(label)``; draws a bar on a terminal, else prints one line per step."""
    if _bars():
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[label]}"), console=console, transient=False) as bar:
            handle = bar.add_task(description, total=total, label="")
            yield lambda label="": bar.update(handle, advance=1, label=label)
        return
    done = [0]

    def advance(label: str = "") -> None:
        done[0] += 1
        say(f"{description}: {done[0]}/{total} {label}".rstrip())

    yield advance
