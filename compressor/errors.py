"""Errors a user can act on.

Every error the library raises on purpose is a `TapcError` whose message is one line
saying what is wrong and how to fix it. The CLI turns them into exit codes:
`UsageError` (bad input, exit 2) and `JobError` (the job itself failed, exit 1).
"""


class TapcError(Exception):
    """Base class; the message is one line for the user."""

    exit_code = 1


class UsageError(TapcError):
    """The input (model, recipe, dataset, flags) is wrong; the user must change it."""

    exit_code = 2


class JobError(TapcError):
    """The input was accepted but the job could not finish."""

    exit_code = 1


class ExportError(JobError):
    """An export failed after the other outputs were written; `result` describes them."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result
