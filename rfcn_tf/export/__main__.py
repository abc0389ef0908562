"""`python -m rfcn_tf.export`: see rfcn_tf/export/cli.py."""

from rfcn_tf.export import cli

if __name__ == "__main__":
    cli.run()
