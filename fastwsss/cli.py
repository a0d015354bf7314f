"""What the commands share: a user's mistake (a bad config, a missing or corrupt file, a checkpoint that does not
fit, a folder another process holds) ends as one line on stderr and exit status 2, not a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DataError, LabelFileError
from .files import DirLockedError
from .runtime import shutdown_distributed

USER_ERRORS = (ConfigError, DataError, LabelFileError, CheckpointError, DirLockedError, FileNotFoundError,
               FileExistsError)


def user_errors(main: Callable) -> Callable:
    """Wrap a command's ``main``: the errors a user can fix become ``error: <message>`` and exit status 2; under
    torchrun the process group is left when the command ends."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        finally:
            shutdown_distributed()

    return wrapped
