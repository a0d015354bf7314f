"""What the commands share: a user's mistake (a bad config, a missing or corrupt file, a checkpoint that does not
fit, a folder another process holds) ends as one line on stderr and exit status 2, not a traceback; a run stopped by
non-finite steps or a file that could not be written (a full disk), as one line and exit status 1."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DataError, LabelFileError
from .files import DirLockedError, WriteError
from .runtime import shutdown_distributed

USER_ERRORS = (ConfigError, DataError, LabelFileError, CheckpointError, DirLockedError, FileNotFoundError,
               FileExistsError)
# A run that stopped because its steps kept going non-finite (training's ten skipped steps) is not a mistake found at
# start, so not status 2: the run began and its last checkpoint is good. It is one line too, with status 1, the
# status of a run that failed (as infer's when an image failed): the message names the step, the problem and where the
# last good checkpoint is; a traceback into the loop would say nothing more.
# A file that could not be written (a full disk: WriteError says which file, why, and what is intact) stops a command
# that was running fine: status 1 as well.
STOPPED_ERRORS = (FloatingPointError, WriteError)
STOPPED_STATUS = 1


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
        except STOPPED_ERRORS as err:
            print(f"error: {'training stopped: ' if isinstance(err, FloatingPointError) else ''}{err}", file=sys.stderr)
            sys.exit(STOPPED_STATUS)
        finally:
            shutdown_distributed()

    return wrapped
