"""Where a run's facts go besides the store: notifications, trackers, TensorBoard."""
