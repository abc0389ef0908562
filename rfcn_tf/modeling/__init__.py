"""The R-FCN model: backbone, RPN, position-sensitive head, losses with OHEM, inference.

  build_model(model_config, *, psroi_impl=None, load_pretrained=True) -> RfcnModel

See rfcn_model.RfcnModel for the call signatures and outputs.
"""

from rfcn_tf.modeling.builder import build_model, validate_model_config
from rfcn_tf.modeling.rfcn_model import LOSS_KEYS, RfcnModel

__all__ = ["LOSS_KEYS", "RfcnModel", "build_model", "validate_model_config"]
