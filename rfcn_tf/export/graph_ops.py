"""Which ops an exported SavedModel needs, and which of them stock TensorFlow lacks.

`saved_model_op_types` reads saved_model.pb as a protobuf (nothing is loaded or run):
the op of every node of every MetaGraph's graph and of every function in its library
(the bodies of tf.function, while_loop and map_fn included). Calls of library
functions by name are not ops and are left out.

`registered_op_names` lists the ops registered in this process (TF_GetAllOpList). In a
process that never loaded rfcn_tf's op library that is stock TensorFlow, which is what
TF Serving, TFLite's converter and tf2onnx understand.
"""

from __future__ import annotations

import os
from typing import Iterable, Set

CUSTOM_OP_PREFIX = "RfcnPsRoiPool"


def saved_model_op_types(saved_model_dir: str) -> Set[str]:
    """Op type names used anywhere in saved_model_dir/saved_model.pb."""
    from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=import-outside-toplevel
    path = os.path.join(saved_model_dir, "saved_model.pb")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{saved_model_dir} is not a SavedModel directory "
                                "(no saved_model.pb)")
    proto = saved_model_pb2.SavedModel()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    ops: Set[str] = set()
    functions: Set[str] = set()
    for meta_graph in proto.meta_graphs:
        library = meta_graph.graph_def.library
        functions.update(f.signature.name for f in library.function)
        ops.update(node.op for node in meta_graph.graph_def.node)
        for function in library.function:
            ops.update(node.op for node in function.node_def)
    return ops - functions


def registered_op_names() -> Set[str]:
    """Names of all ops registered in this process's TensorFlow."""
    from tensorflow.core.framework import op_def_pb2  # pylint: disable=import-outside-toplevel
    from tensorflow.python.client import pywrap_tf_session  # pylint: disable=import-outside-toplevel
    op_list = op_def_pb2.OpList()
    op_list.ParseFromString(pywrap_tf_session.TF_GetBuffer(pywrap_tf_session.TF_GetAllOpList()))
    return {op.name for op in op_list.op}


def custom_ops(op_types: Iterable[str]) -> Set[str]:
    """The rfcn_tf custom ops (compiled PSRoIPool) among `op_types`."""
    return {op for op in op_types if op.startswith(CUSTOM_OP_PREFIX)}
