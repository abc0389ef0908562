"""One worker of the 2-process MultiWorkerMirroredStrategy test (run as a script).

  TF_CONFIG=... python tests/multiworker_worker.py CONFIG_FILE MODEL_DIR OVERRIDE WEIGHTS_NPZ

Trains with rfcn_tf.training.loop.run_training (train.distribution must be
"multi_worker") and, when training ends, saves this worker's detector
weights to WEIGHTS_NPZ (trainable ones as "t<i>", the others as "n<i>"), its
final step as "step", the strategy's replica count as "replicas", and as
"replica_batch_sizes" the batch size of the images that each of its replicas'
train_step got (the static size, known since training batches drop the
remainder; recorded for each local replica when the step is traced).
"""

import sys

import numpy as np

import rfcn_tf  # noqa: F401
import tf_keras

from training_helpers import train_in_this_process


class SaveWeights(tf_keras.callbacks.Callback):
    def __init__(self, path):
        super().__init__()
        self.path = path
        self.replica_batch_sizes = []

    def on_train_begin(self, logs=None):
        # fit() traces its train function at the first step, looking train_step up then.
        train_step = self.model.train_step

        def recording_train_step(batch):
            self.replica_batch_sizes.append(batch["images"].shape[0])
            return train_step(batch)
        self.model.train_step = recording_train_step

    def on_train_end(self, logs=None):
        detector = self.model.detector
        arrays = {f"t{i}": v.numpy() for i, v in enumerate(detector.trainable_variables)}
        arrays.update({f"n{i}": v.numpy() for i, v in enumerate(detector.non_trainable_variables)})
        arrays["step"] = np.array(int(self.model.optimizer.iterations.numpy()))
        arrays["replicas"] = np.array(self.model.distribute_strategy.num_replicas_in_sync)
        arrays["replica_batch_sizes"] = np.array(self.replica_batch_sizes)
        np.savez(self.path, **arrays)


def main(config_file, model_dir, override, weights_path):
    train_in_this_process(config_file, model_dir, override, SaveWeights(weights_path))


if __name__ == "__main__":
    main(*sys.argv[1:5])
