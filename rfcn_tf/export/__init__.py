"""Deployment of a trained detector.

  saved_model  SavedModel export for TF Serving (signatures, assets, both flavours)
  inputs       serving input types, request checks, in-graph preprocessing
  graph_ops    op types of an export, and the ones stock TensorFlow lacks
  tflite       TFLite conversion (builtin ops, four variants) and an ai_edge_litert runner
  onnx         ONNX conversion (tf2onnx) and an onnxruntime runner; the TensorRT route
  tftrt        TF-TRT conversion, refused with the reason where TensorFlow has no TensorRT
  predictor    run an export on image files: JSON records and drawn PNGs
  drawing      detection records and box drawing

Commands: `python -m rfcn_tf.export`, `python -m rfcn_tf.convert`,
`python -m rfcn_tf.predict`. See docs/serving.md and docs/deployment.md.
"""
