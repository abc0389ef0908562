"""One-line errors for the training and evaluation commands (`rfcn_tf.train`,
`rfcn_tf.evaluate`)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import sys
from typing import Iterator, NoReturn, Optional, Tuple, Type

import tensorflow as tf
from absl import logging

from rfcn_tf import configs
from rfcn_tf.data import input_pipeline
from rfcn_tf.data.records import DataError
from rfcn_tf.export import error_line

# Errors that say what is wrong with the command's input in their message.
USER_ERRORS: Tuple[Type[BaseException], ...] = (configs.ConfigError, DataError,
                                                FileNotFoundError)


# What writing a file raises: OSError from Python's file functions; from TensorFlow's
# (tf.io.gfile, checkpoint saves, summaries) the errors its file systems map the OS
# reasons to: a parent that is not a directory, or a directory in a file's place
# (FailedPrecondition), a full disk or quota (ResourceExhausted), no permission or a
# read-only file system (PermissionDenied).
WRITE_ERRORS: Tuple[Type[BaseException], ...] = (
    OSError, tf.errors.FailedPreconditionError, tf.errors.ResourceExhaustedError,
    tf.errors.PermissionDeniedError)

# Errnos that only a write gives (Python's file functions report them at flush or close
# without naming the file).
_FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

# The OS reasons a TensorFlow file-system error names (strerror of the errno, or
# TensorFlow's own "is not a directory") when a write fails; a message without one (a
# GPU out-of-memory, "Could not find variable a/b") is no write failure.
_WRITE_REASONS = tuple(os.strerror(code) for code in (
    errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
    errno.EISDIR, errno.EXDEV)) + ("is not a directory",)


def _near(path: str, directory: str) -> bool:
    """Whether `path` is `directory`, a path inside it, or a parent directory of it other
    than the root (both made absolute, relative to the working directory)."""
    path, directory = os.path.abspath(path), os.path.abspath(directory)
    if path == os.path.dirname(path):  # the root
        return False
    return os.path.commonpath([path, directory]) in (path, directory)


def write_failure(error: BaseException, directory: str) -> Optional[str]:
    """What failed, when `error` is a failure to write into `directory`; else None.

    That is an OSError whose filename is `directory`, a path inside it or a parent
    directory of it (_near): "<filename>: <OS reason>"; an OSError without a filename
    whose errno is a full disk or quota: "<OS reason>"; or a TensorFlow error of
    WRITE_ERRORS whose message names a write's OS reason (_WRITE_REASONS) and holds such a
    path (a run of characters without whitespace, ';' or quotes that has a path
    separator or is a leading part of `directory` as given; a path with whitespace is
    not recognised): its error_line, "<path>; <OS
    reason>" or "<path> is not a directory". A GPU out-of-memory ResourceExhaustedError,
    or a failure on a file elsewhere, is not one. With `directory` "." (or a parent of
    the working directory) a failure on any file below it counts.
    """
    if isinstance(error, OSError):
        paths = [os.fsdecode(p) for p in (error.filename, error.filename2)
                 if isinstance(p, (str, bytes, os.PathLike))]  # not a file descriptor
        near = [p for p in paths if _near(p, directory)]
        if near:
            return f"{near[0]}: {error.strerror or error}"
        if not paths and error.errno in _FULL_DISK_ERRNOS:
            return error.strerror
        return None
    if isinstance(error, WRITE_ERRORS):
        line = error_line(error)
        parts = os.path.normpath(directory).split(os.sep)
        # Leading parts of `directory` as given: "runs is not a directory" for runs/md.
        leading = {os.sep.join(parts[:i]) for i in range(1, len(parts) + 1)}
        paths = [token for token in (t.rstrip(":,)") for t in re.findall(r"[^\s;'\"]+", line))
                 if os.sep in token or token in leading]
        if any(reason in line for reason in _WRITE_REASONS) and any(
                _near(path, directory) for path in paths):
            return line
    return None


@contextlib.contextmanager
def exit_on_user_error(program: str,
                       errors: Tuple[Type[BaseException], ...] = USER_ERRORS,
                       written_dir: Optional[str] = None,
                       write_advice: str = "") -> Iterator[None]:
    """Runs the body; exits with status 1 and the single line "<program>: error: <message>"
    on stderr when it raises one of `errors` (also logged), or the input pipeline's
    strict_label_map refusal (input_pipeline.strict_label_failure), or, with
    `written_dir`, a failure to write into that directory (write_failure): the line is
    then "<program>: error: cannot write to <written_dir>: <what failed>; <write_advice>".
    Anything else propagates.

    A failed checkpoint restore leaves TensorFlow objects that warn, when collected at
    exit, about every checkpoint value left unrestored (~150 lines after the error), so
    TensorFlow's logger is set to ERROR before exiting.
    """
    try:
        yield
    except errors as e:
        _exit(program, str(e))
    except tf.errors.InvalidArgumentError as e:
        refusal = input_pipeline.strict_label_failure(e)
        if refusal is None:
            raise
        sys.exit(f"{program}: error: {refusal}")
    except WRITE_ERRORS as e:
        detail = None if written_dir is None else write_failure(e, written_dir)
        if detail is None:
            raise
        _exit(program, f"cannot write to {written_dir}: {detail}"
                       + (f"; {write_advice}" if write_advice else ""))


def _exit(program: str, message: str) -> NoReturn:
    """Logs `message`, quiets TensorFlow's logger (see exit_on_user_error) and exits with
    status 1 and "<program>: error: <message>"."""
    logging.error("%s", message)
    tf.get_logger().setLevel("ERROR")
    sys.exit(f"{program}: error: {message}")
