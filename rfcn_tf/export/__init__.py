"""Deployment: SavedModel export for TF Serving (saved_model, inputs), TFLite (tflite),
ONNX for onnxruntime and TensorRT (onnx), TF-TRT (tftrt), op listing (graph_ops) and
detection drawing (drawing). Commands: `python -m rfcn_tf.export`,
`python -m rfcn_tf.convert`, `python -m rfcn_tf.predict`. See docs/deployment.md.
"""
