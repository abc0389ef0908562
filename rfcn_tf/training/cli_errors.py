"""One-line errors for the training and evaluation commands (`rfcn_tf.train`,
`rfcn_tf.evaluate`)."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Tuple, Type

import tensorflow as tf
from absl import logging

from rfcn_tf import configs
from rfcn_tf.data import input_pipeline
from rfcn_tf.data.records import DataError

# Errors that say what is wrong with the command's input in their message.
USER_ERRORS: Tuple[Type[BaseException], ...] = (configs.ConfigError, DataError,
                                                FileNotFoundError)


@contextlib.contextmanager
def exit_on_user_error(program: str,
                       errors: Tuple[Type[BaseException], ...] = USER_ERRORS) -> Iterator[None]:
    """Runs the body; exits with status 1 and the single line "<program>: error: <message>"
    on stderr when it raises one of `errors` (also logged), or the input pipeline's
    strict_label_map refusal (input_pipeline.strict_label_failure). Anything else
    propagates.

    A failed checkpoint restore leaves TensorFlow objects that warn, when collected at
    exit, about every checkpoint value left unrestored (~150 lines after the error), so
    TensorFlow's logger is set to ERROR before exiting.
    """
    try:
        yield
    except errors as e:
        logging.error("%s", e)
        tf.get_logger().setLevel("ERROR")
        sys.exit(f"{program}: error: {e}")
    except tf.errors.InvalidArgumentError as e:
        refusal = input_pipeline.strict_label_failure(e)
        if refusal is None:
            raise
        sys.exit(f"{program}: error: {refusal}")
