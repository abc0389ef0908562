"""Which ops an exported SavedModel needs, and which of them stock TensorFlow lacks.

`saved_model_op_types` reads saved_model.pb as a protobuf (nothing is loaded or run):
the op of every node of every MetaGraph's graph and of every function in its library
(the bodies of tf.function, while_loop and map_fn included). Calls of library
functions by name are not ops and are left out. A saved_model.pb that is not a
SavedModel protobuf (corrupt, truncated, empty) raises InvalidSavedModelError.
"""

from __future__ import annotations

import os
from typing import Iterable, Set

CUSTOM_OP_PREFIX = "RfcnPsRoiPool"


class InvalidSavedModelError(ValueError):
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
