"""One exception type for problems the user can fix; CLIs print its message and exit 2."""
from __future__ import annotations

import errno
import functools
import sys

import click


class UserError(Exception):
    """A problem with the user's input, config or environment, stated in one clear sentence."""

    exit_code = 2


def is_disk_full(e: OSError) -> bool:
    """A write failed for lack of space: a full device (ENOSPC) or an exhausted quota (EDQUOT)."""
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def user_errors(fn):
    """Decorator for click commands: UserError -> message on stderr and its exit code, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper
