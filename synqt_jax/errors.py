"""Errors a user can cause and fix, told apart from bugs.

Every designed error (a bad config field, a missing data folder, a corrupt
image, a checkpoint that does not fit, a workdir in use, a diverged run, ...)
derives from `UserError`, with a message that says what is wrong and what to
do; launch.py prints it as one `Error: ...` line and exits 1. Any other
exception is a bug and keeps its traceback. An error that several modules
raise is defined here; one module's own errors are defined beside its code.
"""
import errno
from typing import Iterator

NO_SPACE_LEFT = 'No space left on device'


class UserError(Exception):
  """Something the user can fix; the message names the problem and the fix."""


class DataConfigError(UserError, ValueError):
  """A data config field with a bad value; the message names the field."""


class CheckpointError(UserError, ValueError):
  """A checkpoint that cannot be used; the message says why and what to do."""


def chain(error: BaseException) -> Iterator[BaseException]:
  """`error`, then what it was raised from or while handling, innermost last."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def innermost_user_error(error: BaseException) -> UserError | None:
  """The first UserError raised on the way to `error` (None if there is none).

  Libraries re-raise what they catch (absl's flag parser, ml_collections'
  config file loader); the innermost UserError holds the original message.
  """
  found = None
  for link in chain(error):
    if isinstance(link, UserError):
      found = link
  return found


def is_disk_full(error: BaseException) -> bool:
  """Whether `error` comes from a full disk (an ENOSPC OSError, however wrapped).

  TensorStore, under orbax, reports it as ValueError('RESOURCE_EXHAUSTED: ...
  No space left on device').
  """
  return any(isinstance(link, OSError) and link.errno == errno.ENOSPC
             or NO_SPACE_LEFT in str(link) for link in chain(error))


def unreadable_npz(error: Exception) -> str:
  """Why `np.load` could not read an .npz, without numpy's advice.

  numpy answers a file that is no .npz with "... use allow_pickle=True",
  which would be wrong (and unsafe) advice for a checkpoint or an export.
  """
  if 'allow_pickle' in str(error):
    return 'not an .npz file'
  return f'{type(error).__name__}: {error}'
