"""SGD with momentum, L2 weight decay on kernels only, gradient clipping, loss scaling.

Weight decay is the paper's (Caffe's) coupled form: the term
`0.5 * weight_decay * sum(w ** 2)` over convolution/dense kernels is added to
the loss, so each kernel's gradient gains `weight_decay * w` and momentum acts
on it. Batch-norm parameters and biases are not decayed.

Clipping (`clip_norm > 0`) rescales the gradients, after they are summed over
replicas and after loss-scale removal, so their global norm is at most
`clip_norm` (tf_keras' `global_clipnorm`).

With the `mixed_float16` policy the optimizer is wrapped in tf_keras'
`LossScaleOptimizer` (dynamic loss scaling); `mixed_bfloat16` needs none.
"""

from __future__ import annotations

from typing import List

import tensorflow as tf
import tf_keras

from rfcn_tf.configs import ConfigError, OptimizerConfig
from rfcn_tf.training.schedules import build_learning_rate_schedule

MIXED_PRECISION_POLICIES = ("", "float32", "mixed_float16", "mixed_bfloat16")


def set_precision_policy(policy: str) -> None:
    """Sets the global tf_keras dtype policy ("" or "float32" means float32)."""
    if policy not in MIXED_PRECISION_POLICIES:
        raise ConfigError(f"train.mixed_precision must be one of {list(MIXED_PRECISION_POLICIES)}, "
                          f"got {policy!r}")
    tf_keras.mixed_precision.set_global_policy(policy or "float32")


def build_optimizer(config: OptimizerConfig, total_steps: int,
                    mixed_precision: str = "") -> tf_keras.optimizers.Optimizer:
    """SGD(momentum) on the configured schedule, loss-scaled for mixed_float16."""
    schedule = build_learning_rate_schedule(config, total_steps)
    optimizer = tf_keras.optimizers.SGD(
        learning_rate=schedule, momentum=config.momentum,
        global_clipnorm=config.clip_norm if config.clip_norm > 0 else None)
    if mixed_precision == "mixed_float16":
        optimizer = tf_keras.mixed_precision.LossScaleOptimizer(optimizer)
    return optimizer


def last_learning_rate(optimizer: tf_keras.optimizers.Optimizer) -> tf.Tensor:
    """The learning rate of the most recent update (float32 scalar).

    Before the first update this is the schedule's value at step 0.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return tf.cast(tf.convert_to_tensor(inner.learning_rate), tf.float32)


def is_decayed_variable(variable: tf.Variable) -> bool:
    """True for convolution and dense kernels (names ending in 'kernel')."""
    name = variable.name.split(":")[0]
    return name.endswith("kernel")


def weight_decay_variables(model: tf_keras.Model) -> List[tf.Variable]:
    """The trainable kernels of `model` that weight decay applies to.

    Uses `model.weight_decay_variables()` when the model defines it, otherwise
    the trainable variables whose names end in 'kernel' (so batch-norm gamma,
    beta and all biases are excluded).
    """
    own = getattr(model, "weight_decay_variables", None)
    if callable(own):
        return list(own())
    return [v for v in model.trainable_variables if is_decayed_variable(v)]


def weight_decay_loss(variables: List[tf.Variable], weight_decay: float) -> tf.Tensor:
    """`0.5 * weight_decay * sum(||w||^2)` in float32 (0 when there is nothing to decay)."""
    if weight_decay <= 0 or not variables:
        return tf.constant(0.0, tf.float32)
    return weight_decay * tf.add_n([tf.nn.l2_loss(tf.cast(v, tf.float32)) for v in variables])
