"""`python -m rfcn_tf.ops`: prints which PSRoIPool library this install loads.

One line: its path and the devices it has kernels for ("CPU" or "CPU, GPU"), or why it
does not load. pip shows the build's own lines only with `pip install -v`.
"""

from rfcn_tf.ops import op_library

if __name__ == "__main__":
    print(op_library.describe())
