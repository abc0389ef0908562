"""Which ops an exported SavedModel needs, which of them stock TensorFlow lacks, and
loading an export with them.

`saved_model_op_types` reads saved_model.pb as a protobuf (nothing is loaded or run):
the op of every node of every MetaGraph's graph and of every function in its library
(the bodies of tf.function, while_loop and map_fn included). Calls of library
functions by name are not ops and are left out. A saved_model.pb that is not a
SavedModel protobuf (corrupt, truncated, empty) raises InvalidSavedModelError.
`load_saved_model` loads an export, with the compiled op library first when it uses
the custom op; what keeps it from loading raises a SavedModelLoadError.
"""

from __future__ import annotations

import os
from typing import Iterable, Set

import tensorflow as tf

from rfcn_tf.export import error_line

CUSTOM_OP_PREFIX = "RfcnPsRoiPool"


class SavedModelLoadError(ValueError):
    """An export that cannot be loaded here; the message names the directory and why."""


class InvalidSavedModelError(SavedModelLoadError):
    """A saved_model.pb that is not a SavedModel; the message names the directory."""


def saved_model_op_types(saved_model_dir: str) -> Set[str]:
    """Op type names used anywhere in saved_model_dir/saved_model.pb. Raises
    FileNotFoundError when there is no saved_model.pb, InvalidSavedModelError when it
    cannot be parsed as a SavedModel or holds no MetaGraph (e.g. an empty file)."""
    from google.protobuf import message  # pylint: disable=import-outside-toplevel
    from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=import-outside-toplevel
    path = os.path.join(saved_model_dir, "saved_model.pb")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{saved_model_dir} is not a SavedModel directory "
                                "(no saved_model.pb)")
    proto = saved_model_pb2.SavedModel()
    with open(path, "rb") as f:
        data = f.read()
    try:
        proto.ParseFromString(data)
    except message.DecodeError as error:
        raise InvalidSavedModelError(
            f"{saved_model_dir} is not a valid SavedModel: its saved_model.pb cannot be "
            f"parsed ({error}); re-export it") from None
    if not proto.meta_graphs:
        raise InvalidSavedModelError(f"{saved_model_dir} is not a valid SavedModel: its "
                                     "saved_model.pb holds no MetaGraph (an empty file?); "
                                     "re-export it")
    ops: Set[str] = set()
    functions: Set[str] = set()
    for meta_graph in proto.meta_graphs:
        library = meta_graph.graph_def.library
        functions.update(f.signature.name for f in library.function)
        ops.update(node.op for node in meta_graph.graph_def.node)
        for function in library.function:
            ops.update(node.op for node in function.node_def)
    return ops - functions


def custom_ops(op_types: Iterable[str]) -> Set[str]:
    """The rfcn_tf custom ops (compiled PSRoIPool) among `op_types`."""
    return {op for op in op_types if op.startswith(CUSTOM_OP_PREFIX)}


def load_saved_model(saved_model_dir: str):
    """tf.saved_model.load(saved_model_dir), the compiled op library loaded first when the
    export uses the custom op.

    Raises FileNotFoundError when there is no saved_model.pb, InvalidSavedModelError when
    it is not a SavedModel, and SavedModelLoadError "<dir> uses the custom RfcnPsRoiPool
    op (--psroi_impl=custom), which cannot be loaded here: <the library's reason> ..."
    (with what to do) or "cannot load the SavedModel <dir>: <tf.saved_model.load's
    reason>" (e.g. corrupt or missing variables).
    """
    if custom_ops(saved_model_op_types(saved_model_dir)):
        from rfcn_tf.ops import op_library  # pylint: disable=import-outside-toplevel
        try:
            op_library.load()
        except op_library.OpLibraryUnavailableError as error:
            raise SavedModelLoadError(
                f"{saved_model_dir} uses the custom RfcnPsRoiPool op (--psroi_impl=custom), "
                f"which cannot be loaded here: {error.reason} Re-export the model with "
                "--psroi_impl=portable (stock TensorFlow ops only), or build the op library "
                "(pip install --no-build-isolation -e . in the repository).") from None
    try:
        return tf.saved_model.load(saved_model_dir)
    except (ValueError, OSError, RuntimeError, tf.errors.OpError) as error:
        raise SavedModelLoadError(f"cannot load the SavedModel {saved_model_dir}: "
                                  f"{error_line(error)}") from error
