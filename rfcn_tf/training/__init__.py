"""Training: schedules, optimizer, the Keras train/test steps, callbacks, distribution."""
