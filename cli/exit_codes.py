"""The one place where failures become exit codes: 0 ok, 1 the operation failed, 2 usage error.

A usage error is anything the caller can fix by asking differently (a bad argument, a value over
a limit), whether the CLI noticed it at parse time or the daemon did (control error codes in
:data:`lattica.control.errors.USAGE_CODES`).
"""

from __future__ import annotations

from lattica.control.errors import USAGE_CODES

OK = 0
FAILURE = 1
USAGE = 2


def exit_code_for(error_code: str) -> int:
    """The exit code for a control error code."""
    return USAGE if error_code in USAGE_CODES else FAILURE
