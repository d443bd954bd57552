"""Progress and talk on stderr: a rich progress bar on a terminal, plain line-buffered lines otherwise (CI
logs stay readable). Results go to stdout, never through here."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


def say(message: str) -> None:
    console.print(message, highlight=False) if console.is_terminal else print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    say(f"warning: {message}" if not console.is_terminal else f"[yellow]warning:[/yellow] {message}")


@contextmanager
def task(description: str, total: int):
    """Yields ``advance(label)``; draws a bar on a terminal, else prints one line per step."""
    if console.is_terminal:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.fields[label]}"), console=console, transient=False) as bar:
            handle = bar.add_task(description, total=total, label="")
            yield lambda label="": bar.update(handle, advance=1, label=label)
        return
    done = [0]

    def advance(label: str = "") -> None:
        done[0] += 1
        print(f"{description}: {done[0]}/{total} {label}".rstrip(), file=sys.stderr, flush=True)

    yield advance
