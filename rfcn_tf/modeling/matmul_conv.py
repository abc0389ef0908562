"""A "same" convolution that runs inference on CPU as shifted matrix products.

Why: TensorFlow 2.20's CPU (oneDNN) Conv2D is slow for wide, small-map convolutions such
as R-FCN's RPN conv (3x3, 1024 -> 512 channels on a 38x63 conv4 map at 600x1000): on the
2-core development machine it ran at 123 GFLOP/s, while the same FLOPs as nine
[H*W, C] x [C, F] matmuls ran at 225 GFLOP/s (184 vs 100 ms, medians of 12 alternating
calls; `python bench/conv_forms.py`). The 1x1 convs of the position-sensitive head gain
less (one matmul each: 1.11x for the 2048 -> 1024 reduce conv, 1.34x for the 1024 -> 1029
class maps). The backward pass of the matmul form is not faster, so training keeps
Conv2D (also when the training flag is a tensor known only at run time), and so do ops
placed on a GPU (cuDNN; see MatmulConv2D.call).

The form is chosen when a graph is traced, so it stays in what is saved from that
graph: SavedModel exports therefore switch it off (`matmul_inference=False`, see
rfcn_tf.export.saved_model), since an export may be served on a GPU or converted to
TFLite, where one convolution op is the better graph.
"""

from __future__ import annotations

import tensorflow as tf
import tf_keras

from rfcn_tf.ops import placement


@tf_keras.utils.register_keras_serializable(package="rfcn_tf")
class MatmulConv2D(tf_keras.layers.Conv2D):
    """tf_keras Conv2D with padding "same", stride 1, no dilation and an odd square kernel,
    whose inference on CPU sums k*k shifted matmuls instead of calling Conv2D.

    Same constructor (kernel_size, strides, padding, dilation are fixed as above), same
    variables (kernel [k, k, C, F], bias [F]) and checkpoints as Conv2D. Output
    [B, H, W, F] for input [B, H, W, C], NHWC; equal to Conv2D's up to float rounding
    (the sum runs in another order):
        out[b, h, w, f] = sum_{i, j < k, c} pad(x)[b, h + i, w + j, c] * kernel[i, j, c, f]
    with pad(x) zero-padded by (k - 1) / 2 on every side, then + bias and activation.
    call(inputs, training) takes the matmul form only when, at trace time, all of these hold:
    `training` is None (what Keras passes when neither the call nor an enclosing layer's
    call sets it) or has the static value False (a Python bool or a constant tensor; a bool
    tensor whose value is known only at run time counts as training); matmul_inference is
    true; and placement.runs_on_gpu(inputs) is false (no GPU visible; or, in a graph, a
    tf.device scope of the inputs that is not a GPU; in eager mode, a current device
    scope that is not a GPU). Otherwise it runs Conv2D itself.
    """

    def __init__(self, filters: int, kernel_size: int = 3, matmul_inference: bool = True,
                 **kwargs):
        for fixed, allowed in (("padding", ("same",)), ("strides", (1,)),
                               ("dilation_rate", (1,)), ("groups", (1,)),
                               ("data_format", (None, "channels_last"))):
            value = kwargs.get(fixed, allowed[0])
            if isinstance(value, (list, tuple)) and len(set(value)) == 1:
                value = value[0]  # (1, 1) and, after a JSON round trip, [1, 1]
            if isinstance(value, str):
                value = value.lower()
            if value not in allowed:
                raise ValueError(f"MatmulConv2D: {fixed} must be {allowed[0]!r}, got "
                                 f"{kwargs[fixed]!r}")
        kwargs.update(padding="same", strides=1, dilation_rate=1)
        super().__init__(filters, kernel_size, **kwargs)
        if self.kernel_size[0] != self.kernel_size[1] or self.kernel_size[0] % 2 == 0:
            raise ValueError(f"MatmulConv2D: kernel_size must be odd and square, got "
                             f"{self.kernel_size}")
        self.matmul_inference = matmul_inference

    def get_config(self):
        return {**super().get_config(), "matmul_inference": self.matmul_inference}

    @staticmethod
    def is_inference(training) -> bool:
        """Whether `training` means inference at trace time: None, or a static value that
        is false. A tensor whose value is unknown at trace time means training."""
        if training is None:
            return True
        value = tf.get_static_value(training)
        return value is not None and not bool(value)

    def call(self, inputs, training=None):
        if (not (self.is_inference(training) and self.matmul_inference)
                or placement.runs_on_gpu(inputs)):
            return super().call(inputs)
        k = self.kernel_size[0]
        margin = k // 2
        shape = tf.shape(inputs)
        batch, height, width = shape[0], shape[1], shape[2]
        channels = inputs.shape[-1]
        padded = (tf.pad(inputs, [[0, 0], [margin, margin], [margin, margin], [0, 0]])
                  if margin else inputs)
        kernel = tf.cast(self.kernel, inputs.dtype)
        total = None
        for i in range(k):
            for j in range(k):
                window = tf.reshape(padded[:, i:i + height, j:j + width, :], [-1, channels])
                term = tf.matmul(window, kernel[i, j])
                total = term if total is None else total + term
        outputs = tf.reshape(total, [batch, height, width, self.filters])
        if self.use_bias:
            outputs = tf.nn.bias_add(outputs, tf.cast(self.bias, outputs.dtype))
        return self.activation(outputs) if self.activation is not None else outputs
