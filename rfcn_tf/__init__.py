"""rfcn-tf: R-FCN object detection for TensorFlow 2 / tf_keras.

Importing this package makes `tf.keras` mean tf_keras (Keras 2), the Keras
that tf-models-official is built on, by setting TF_USE_LEGACY_KERAS=1 before
TensorFlow is imported. Import rfcn_tf before tensorflow, or set the variable
yourself.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

__version__ = "0.1.0"
