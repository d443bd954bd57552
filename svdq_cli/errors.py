"""svdq's exceptions. Each carries the exit code the CLI maps it to (DESIGN.md §5)."""


class SvdqError(Exception):
    """A failure svdq can explain in one line; exit code 1 (runtime failure)."""

    exit_code = 1


class BadInputError(SvdqError, ValueError):
    """Bad usage or bad input (shapes, values, files, config); exit code 2."""

    exit_code = 2


class QualityGateError(SvdqError):
    """A validation gate (minimum PSNR, …) failed; exit code 3."""

    exit_code = 3
