"""Trains like `python -m rfcn_tf.train --mode=train` with train.distribution="mirrored"
over two logical CPU devices (two replicas fed by one input pipeline), recording the
`start_batch` it builds the training dataset with.

  python tests/two_replica_worker.py CONFIG_FILE MODEL_DIR OVERRIDE START_BATCH_FILE

MirroredStrategy() takes the local GPUs, or the one CPU; this process splits the CPU into
two logical devices and mirrors over both, so a machine without GPUs runs two replicas.
"""

import sys

import tensorflow as tf

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * 2)

import tf_keras  # noqa: E402

from rfcn_tf.training import distribution  # noqa: E402
from resume_worker import record_start_batch  # noqa: E402
from training_helpers import train_in_this_process  # noqa: E402

REPLICAS = 2


def mirror_over_two_cpus(name):
    assert name == "mirrored", name
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == REPLICAS
    return strategy


def main(config_file, model_dir, override, start_batch_file):
    record_start_batch(start_batch_file)
    distribution.build_strategy = mirror_over_two_cpus
    train_in_this_process(config_file, model_dir, override, tf_keras.callbacks.Callback())


if __name__ == "__main__":
    main(*sys.argv[1:5])
