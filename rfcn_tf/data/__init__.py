"""Data layer: readers (Pascal VOC, COCO, TFRecord), converters to sharded
TFRecords, a seeded synthetic dataset and the tf.data input pipeline.

Entry points:
  rfcn_tf.data.input_pipeline.build_dataset(data_config, batch_size, input_context)
  rfcn_tf.data.synthetic.generate(output_dir, num_images, ...)
  python -m rfcn_tf.data.convert --format=voc|coco|synthetic|tfrecord ...

Box convention everywhere in this package: (ymin, xmin, ymax, xmax), continuous
pixel coordinates (a box from 0 to W covers the whole width), class ids 1-based.
"""
