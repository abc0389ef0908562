"""R-FCN ops: position-sensitive RoI pooling, compiled or from stock TF ops.

  psroi_pool(score_maps, rois, *, group_size, spatial_scale, implementation="auto")

See rfcn_tf.ops.psroi_pool for the exact semantics, op_library for the compiled
library, psroi_pool_portable for the stock-TF twin.
"""

from rfcn_tf.ops.op_library import OpLibraryUnavailableError
from rfcn_tf.ops.psroi_pool import IMPLEMENTATIONS, psroi_pool

__all__ = ["IMPLEMENTATIONS", "OpLibraryUnavailableError", "psroi_pool"]
