"""Random training augmentation, stateless: every draw is a function of a seed.

A seed is an int64 tensor of shape [2]; the pipeline gives each element its
own, so results do not depend on thread scheduling.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import tensorflow as tf
from official.vision.ops import box_ops


def random_horizontal_flip(image: tf.Tensor, boxes: tf.Tensor, seed: tf.Tensor,
                           probability: float = 0.5) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Flips image [H, W, C] and NORMALIZED boxes [N, 4] left-right together.

    Column c goes to W - 1 - c and a box [xmin, xmax] to [1 - xmax, 1 - xmin].
    Returns (image, boxes, flipped bool scalar).
    """
    flip = tf.random.stateless_uniform([], seed=seed) < probability
    image = tf.cond(flip, lambda: tf.image.flip_left_right(image), lambda: image)
    boxes = tf.cond(flip, lambda: box_ops.horizontal_flip_boxes(boxes), lambda: boxes)
    return image, boxes, flip


def random_short_side(choices: Sequence[int], seed: tf.Tensor) -> tf.Tensor:
    """One of `choices`, uniformly, as a float32 scalar (multi-scale training)."""
    index = tf.random.stateless_uniform([], seed=seed, minval=0, maxval=len(choices),
                                        dtype=tf.int32)
    return tf.gather(tf.constant(choices, tf.float32), index)
