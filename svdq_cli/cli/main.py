"""The ``svdq`` command line (DESIGN.md §5): the app assembled from one module per command, and the entry point.

Exit codes: 0 success; 1 runtime failure; 2 bad usage or bad input; 3 a quality gate failed; 130 interrupted
(Ctrl-C); 143 terminated (SIGTERM). Errors are one line on stderr; ``--debug`` shows the traceback. Results go
to stdout (``--json``: exactly one document).
"""

from __future__ import annotations

import signal
import sys
import traceback
from typing import Annotated

import typer

from ..errors import SvdqError, gist
from ..system.distributed import leave, world_size
from ..system.threads import configure_threads
from ..version import __version__
from . import bench, evaluate, export, inspect, lora, push, quantize, recipes, status, targets, validate
from .common import Command, Group

app = typer.Typer(cls=Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="SVDQuant 4-bit quantization for diffusion transformers.")

_state = {"debug": False}


def _print_version(value: bool) -> None:
    if value:
        print(f"svdq {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, metavar="",
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", metavar="", help="Show tracebacks of errors (accepted anywhere "
                                                                    "on the command line).")] = False,
) -> None:
    _state["debug"] = _state["debug"] or debug


for command in (quantize.quantize, targets.targets, validate.validate, export.export, status.status, recipes.recipes,
                inspect.inspect):
    app.command(cls=Command)(command)
app.command("push-to-hub", cls=Command)(push.push_to_hub)
lora_app = typer.Typer(cls=Group, help="Off-the-shelf LoRAs on quantized exports, with no re-quantization.")
lora_app.command("apply", cls=Command)(lora.lora_apply)
app.add_typer(lora_app, name="lora")
app.command(cls=Command)(bench.bench)
app.command("eval", cls=Command)(evaluate.evaluate)


class Terminated(BaseException):
    """SIGTERM (what CI systems and ``timeout`` send), raised where the process is, so that it unwinds as an
    interrupt does: temporary files removed, the lock released, what is finished kept. Not a KeyboardInterrupt,
    which typer turns into exit 130 on its way out."""


def _terminate(_signum, _frame) -> None:
    raise Terminated


def _fail(message: str, code: int) -> None:
    """One line on stderr and the exit code (the traceback too with --debug)."""
    if _state["debug"] and sys.exc_info()[0] is not None:
        traceback.print_exc()
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    """Console entry point: every failure is one line on stderr and a documented exit code (DESIGN.md §5)."""
    try:
        _main()
    except SystemExit as done:
        leave(done.code)
        raise


def _main() -> None:
    args = sys.argv[1:]
    _state["debug"] = "--debug" in args  # accepted before or after the command
    args = [arg for arg in args if arg != "--debug"]
    configure_threads()
    signal.signal(signal.SIGTERM, _terminate)
    command = next((arg for arg in args if not arg.startswith("-")), None)
    if world_size() > 1 and command not in (None, "quantize", "eval"):
        _fail(f"under torchrun only `svdq quantize` and `svdq eval` run on several ranks; run `svdq {command}` as "
              "one process", 2)
    try:
        code = app(args=args, prog_name="svdq", standalone_mode=False)
    except SvdqError as error:
        _fail(str(error), error.exit_code)
    except Terminated:
        code = 143
    except KeyboardInterrupt:
        code = 130
    except typer.Abort:  # standard input closed under a prompt
        _fail("aborted", 1)
    except typer.TyperException as error:  # click's usage errors: unknown option or command, bad value, missing
        usage = getattr(error, "exit_code", 1) == 2
        context = getattr(error, "ctx", None)
        if type(error).__name__ == "NoArgsIsHelpError" and context is not None:
            print(context.get_help())
            sys.exit(2)
        hint = f" (see `{context.command_path} --help`)" if usage and context is not None else ""
        _fail(error.format_message().replace("\n", " ") + hint, 2 if usage else error.exit_code)
    except Exception as error:  # unexpected: a bug; its type and the way to the traceback
        if _state["debug"]:
            raise
        _fail(f"unexpected {type(error).__name__}: {gist(error)} (re-run with --debug for the traceback)", 1)
    if code in (130, 143):
        what = "interrupted" if code == 130 else "terminated (SIGTERM)"
        _fail(f"{what}; re-run the same command to resume (finished stages and blocks are kept)", code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
