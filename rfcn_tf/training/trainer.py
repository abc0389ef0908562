"""`DetectionTrainer`: the detector wrapped for `Model.fit` and `Model.evaluate`.

A batch is the input pipeline's dict (`rfcn_tf.data.input_pipeline`):
images [B,Hp,Wp,3] float32, image_info [B,4,2], gt_boxes [B,M,4] (absolute
pixels, ymin/xmin/ymax/xmax in the resized image), gt_classes [B,M] (1-based,
-1 padding), plus evaluation keys that training ignores.

`train_step` reports, as running means over the epoch (Keras resets them at
each epoch start):
  each loss term of the detector (rpn_score_loss, rpn_box_loss,
  rfcn_class_loss, rfcn_box_loss, unweighted); model_loss, the detector's
  weighted sum of them (model.loss weights); l2_loss = 0.5 * weight_decay *
  sum ||w||^2 over the kernels; loss = model_loss + l2_loss (what is
  minimised);
and learning_rate, the rate the step just used.
`test_step` reports the same terms (without learning_rate) with the
detector in inference mode (frozen batch norm, no dropout).

Distribution: each replica's loss is divided by the number of replicas and
the optimizer sums gradients over replicas, so the update is the gradient of
the mean loss over the global batch.

Sampling: the detector's anchor and RoI samplers get the stateless seed
(sampling_seed, step * replicas + replica id) in training, where step is the
optimizer's iteration count (saved in every checkpoint), so a run resumed at
step s draws what an uninterrupted run draws at step s; validation losses use
(sampling_seed, -1 - replica id), the same draw every time.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import tensorflow as tf
import tf_keras

from rfcn_tf.training import optimizer as optimizer_lib

TRAIN_KEYS = ("images", "image_info", "gt_boxes", "gt_classes")


class DetectionTrainer(tf_keras.Model):
    """Trains `detector` with the loss terms it computes plus L2 weight decay.

    The detector (an RfcnModel) gives detections from call(inputs, training=False), the
    loss terms from compute_losses(inputs, training), and both from one pass with
    detect_with_losses(inputs) (evaluation with losses).
    """

    def __init__(self, detector: tf_keras.Model, loss_names: Sequence[str],
                 weight_decay: float, sampling_seed: int = 0, **kwargs):
        """Args:
          detector: the R-FCN model (`rfcn_tf.modeling`):
            `detector.compute_losses(batch, training)` returns a dict holding
            every name in `loss_names` and "model_loss" (float32 scalars),
            `detector(batch, training=False)` the detection dict, and
            `detector.detect_with_losses(batch)` both, in inference mode.
          loss_names: the detector's individual loss terms, in display order.
          weight_decay: L2 coefficient on the kernels
            (`optimizer.weight_decay_variables`).
          sampling_seed: first half of the samplers' stateless seeds (see the
            module docstring).
        """
        super().__init__(**kwargs)
        self.detector = detector
        self.loss_names = list(loss_names)
        self.weight_decay = float(weight_decay)
        self.sampling_seed = int(sampling_seed)
        names = self.loss_names + ["model_loss", "l2_loss", "loss"]
        self._trackers = {name: tf_keras.metrics.Mean(name=name) for name in names}

    @property
    def metrics(self) -> List[tf_keras.metrics.Metric]:
        return list(self._trackers.values())

    def call(self, inputs, training=False):
        return self.detector(inputs, training=training)

    def decayed_variables(self) -> List[tf.Variable]:
        return optimizer_lib.weight_decay_variables(self.detector)

    def _sampling_seed(self, training: bool) -> tf.Tensor:
        """int64 [2]: this replica's sampler seed for this step (see the module docstring)."""
        context = tf.distribute.get_replica_context()
        replica = tf.cast(context.replica_id_in_sync_group if context else 0, tf.int64)
        if training:
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            stream = tf.cast(self.optimizer.iterations, tf.int64) * replicas + replica
        else:
            stream = -1 - replica
        return tf.stack([tf.constant(self.sampling_seed, tf.int64), stream])

    def _detector_inputs(self, batch: Dict[str, tf.Tensor], training: bool
                         ) -> Dict[str, tf.Tensor]:
        inputs = {k: batch[k] for k in TRAIN_KEYS}
        inputs["sampling_seed"] = self._sampling_seed(training)
        return inputs

    def _with_weight_decay(self, terms: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        """The detector's loss terms plus model_loss, l2_loss and loss (float32 scalars)."""
        missing = [name for name in self.loss_names + ["model_loss"] if name not in terms]
        if missing:
            raise ValueError(f"the detector did not return the loss terms {missing} "
                             f"(it returned {sorted(terms)})")
        losses = {name: tf.cast(terms[name], tf.float32)
                  for name in self.loss_names + ["model_loss"]}
        losses["l2_loss"] = optimizer_lib.weight_decay_loss(self.decayed_variables(),
                                                            self.weight_decay)
        losses["loss"] = losses["model_loss"] + losses["l2_loss"]
        return losses

    def compute_all_losses(self, batch: Dict[str, tf.Tensor], training: bool
                           ) -> Dict[str, tf.Tensor]:
        """The detector's loss terms plus model_loss, l2_loss and loss (float32 scalars)."""
        return self._with_weight_decay(
            self.detector.compute_losses(self._detector_inputs(batch, training),
                                         training=training))

    def _report(self, losses: Dict[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        for name, tracker in self._trackers.items():
            tracker.update_state(losses[name])
        return {name: tracker.result() for name, tracker in self._trackers.items()}

    def train_step(self, batch):
        variables = self.detector.trainable_variables
        with tf.GradientTape() as tape:
            losses = self.compute_all_losses(batch, training=True)
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            loss = losses["loss"] / tf.cast(replicas, tf.float32)
        # minimize() scales the loss and unscales the gradients under a
        # LossScaleOptimizer (mixed_float16); it sums gradients over replicas
        # and then applies global-norm clipping when configured.
        self.optimizer.minimize(loss, variables, tape=tape)
        logs = self._report(losses)
        logs["learning_rate"] = optimizer_lib.last_learning_rate(self.optimizer)
        return logs

    def test_step(self, batch):
        return self._report(self.compute_all_losses(batch, training=False))

    def evaluation_outputs(self, batch, with_losses: bool) -> Dict[str, tf.Tensor]:
        """Detections of `batch` in inference mode, plus the loss terms of
        compute_all_losses(batch, training=False) when asked, from the same forward pass
        (the detector's detect_with_losses)."""
        if not with_losses:
            return dict(self.detector({k: batch[k] for k in ("images", "image_info")},
                                      training=False))
        outputs = dict(self.detector.detect_with_losses(self._detector_inputs(batch, False)))
        outputs.update(self._with_weight_decay(outputs))
        return outputs
