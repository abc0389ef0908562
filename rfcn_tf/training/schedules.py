"""Learning-rate schedules: linear warmup, then step decay or cosine decay.

Both schedules are `lr(step) = warmup_factor(step) * decay(step)`, where `step`
is the optimizer's iteration count before the update (0 for the first update):

  warmup_factor(step) = f + (1 - f) * step / W   for step < W,   1 otherwise
                        (W = warmup_steps, f = warmup_start_factor)
  step decay:   decay(step) = base * gamma ** #{b in boundaries : b <= step}
  cosine decay: decay(step) = base * 0.5 * (1 + cos(pi * min(step, T) / T))
                        (T = total training steps)

So with boundaries [20000] the updates 0..19999 use `base` and update 20000
onwards uses `base * gamma`: the paper's "0.001 for 20k iterations, then
0.0001". This is Caffe's and detectron2's multistep convention;
tf_keras' PiecewiseConstantDecay switches one step later (`step > b`), which
is why these schedules are written here.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import tensorflow as tf
import tf_keras

from rfcn_tf.configs import ConfigError, OptimizerConfig


def _warmup_factor(step: tf.Tensor, warmup_steps: int, start_factor: float) -> tf.Tensor:
    if warmup_steps <= 0:
        return tf.constant(1.0, tf.float32)
    ramp = start_factor + (1.0 - start_factor) * step / float(warmup_steps)
    return tf.where(step < float(warmup_steps), ramp, 1.0)


class WarmupStepDecay(tf_keras.optimizers.schedules.LearningRateSchedule):
    """`base * gamma ** #{b <= step}`, times the linear warmup factor."""

    def __init__(self, base_learning_rate: float, boundaries: Sequence[int], decay_factor: float,
                 warmup_steps: int = 0, warmup_start_factor: float = 0.1):
        super().__init__()
        self.base_learning_rate = float(base_learning_rate)
        self.boundaries = [int(b) for b in boundaries]
        self.decay_factor = float(decay_factor)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start_factor = float(warmup_start_factor)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        if self.boundaries:
            passed = tf.reduce_sum(tf.cast(
                step >= tf.constant(self.boundaries, tf.float32), tf.float32))
        else:
            passed = tf.constant(0.0, tf.float32)
        decay = self.base_learning_rate * tf.pow(self.decay_factor, passed)
        return decay * _warmup_factor(step, self.warmup_steps, self.warmup_start_factor)

    def get_config(self):
        return {"base_learning_rate": self.base_learning_rate, "boundaries": self.boundaries,
                "decay_factor": self.decay_factor, "warmup_steps": self.warmup_steps,
                "warmup_start_factor": self.warmup_start_factor}


class WarmupCosineDecay(tf_keras.optimizers.schedules.LearningRateSchedule):
    """`base * 0.5 * (1 + cos(pi * min(step, T) / T))`, times the linear warmup factor."""

    def __init__(self, base_learning_rate: float, total_steps: int, warmup_steps: int = 0,
                 warmup_start_factor: float = 0.1):
        super().__init__()
        self.base_learning_rate = float(base_learning_rate)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start_factor = float(warmup_start_factor)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        progress = tf.minimum(step, float(self.total_steps)) / float(self.total_steps)
        decay = self.base_learning_rate * 0.5 * (1.0 + tf.cos(math.pi * progress))
        return decay * _warmup_factor(step, self.warmup_steps, self.warmup_start_factor)

    def get_config(self):
        return {"base_learning_rate": self.base_learning_rate, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps,
                "warmup_start_factor": self.warmup_start_factor}


# The float settings of OptimizerConfig: NaN or infinity is never valid for any of them
# (NaN passes every range comparison; an infinite clip_norm scales gradients by inf * 0).
FLOAT_KEYS = ("learning_rate", "momentum", "weight_decay", "warmup_start_factor",
              "decay_factor", "clip_norm")


def validate_optimizer_config(config: OptimizerConfig, total_steps: int) -> None:
    """Raises ConfigError naming the key when the schedule cannot be built: a float
    setting (FLOAT_KEYS) that is NaN or infinite, or any setting out of its range."""
    for key in FLOAT_KEYS:
        value = getattr(config, key)
        if not math.isfinite(value):
            raise ConfigError(f"train.optimizer.{key} must be a finite number, got {value}")
    if config.learning_rate <= 0:
        raise ConfigError(f"train.optimizer.learning_rate must be > 0, got {config.learning_rate}")
    if not 0.0 <= config.momentum < 1.0:
        raise ConfigError(f"train.optimizer.momentum must be in [0, 1), got {config.momentum}")
    if config.weight_decay < 0:
        raise ConfigError(f"train.optimizer.weight_decay must be >= 0, got {config.weight_decay}")
    if config.clip_norm < 0:
        raise ConfigError(f"train.optimizer.clip_norm must be >= 0 (0 disables clipping), "
                          f"got {config.clip_norm}")
    if config.warmup_steps < 0 or config.warmup_steps >= max(total_steps, 1):
        raise ConfigError(f"train.optimizer.warmup_steps must be in [0, train.steps={total_steps}), "
                          f"got {config.warmup_steps}")
    if not 0.0 <= config.warmup_start_factor <= 1.0:
        raise ConfigError(f"train.optimizer.warmup_start_factor must be in [0, 1], "
                          f"got {config.warmup_start_factor}")
    if config.schedule == "step":
        bounds: List[int] = list(config.decay_boundaries)
        if any(b <= 0 for b in bounds) or bounds != sorted(set(bounds)):
            raise ConfigError(f"train.optimizer.decay_boundaries must be strictly increasing "
                              f"positive step numbers, got {bounds}")
        if bounds and bounds[-1] >= total_steps:
            raise ConfigError(f"train.optimizer.decay_boundaries {bounds} reach past the end of "
                              f"training (train.steps={total_steps})")
        if not 0.0 < config.decay_factor <= 1.0:
            raise ConfigError(f"train.optimizer.decay_factor must be in (0, 1], "
                              f"got {config.decay_factor}")
    elif config.schedule != "cosine":
        raise ConfigError(f"train.optimizer.schedule must be 'step' or 'cosine', "
                          f"got {config.schedule!r}")


def build_learning_rate_schedule(config: OptimizerConfig, total_steps: int
                                 ) -> tf_keras.optimizers.schedules.LearningRateSchedule:
    """The schedule described by `config` for a run of `total_steps` updates."""
    validate_optimizer_config(config, total_steps)
    if config.schedule == "step":
        return WarmupStepDecay(config.learning_rate, config.decay_boundaries, config.decay_factor,
                               config.warmup_steps, config.warmup_start_factor)
    return WarmupCosineDecay(config.learning_rate, total_steps, config.warmup_steps,
                             config.warmup_start_factor)
