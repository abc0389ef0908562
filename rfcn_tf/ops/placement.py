"""Trace-time guess of where ops will run, for layers that pick a formulation per device."""

import tensorflow as tf
from tensorflow.python.eager import context as eager_context


def runs_on_gpu(tensor: tf.Tensor) -> bool:
    """Best guess whether ops on `tensor` made here run on a GPU.

    In a graph (tf.function), `tensor.device` is the tf.device scope it was made in. In
    eager mode, where `tensor` lives does not decide where the next op runs (a host tensor,
    e.g. from NumPy or tf.data, is copied to the default device), so the current tf.device
    scope is used. With no scope, ops go to a GPU when one is visible. With no GPU
    visible, a GPU scope does not count: soft placement runs the ops on the CPU.
    """
    if not tf.config.list_logical_devices("GPU"):
        return False
    device = eager_context.context().device_name if tf.executing_eagerly() else tensor.device
    return "GPU" in device.upper() if device else True
