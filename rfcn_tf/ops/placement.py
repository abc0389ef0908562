"""Trace-time guess of where ops will run, for layers that pick a formulation per device."""

import tensorflow as tf


def runs_on_gpu(tensor: tf.Tensor) -> bool:
    """Best guess, at trace time, whether ops on `tensor` run on a GPU: its device (eager)
    or the tf.device scope it was made in (graph) if set, else whether a GPU is visible."""
    device = tensor.device
    if device:
        return "GPU" in device.upper()
    return bool(tf.config.list_logical_devices("GPU"))
