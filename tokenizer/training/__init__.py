"""Training: the one loop, its engine (Accelerate, DeepSpeed), optimisers, training-state
checkpoints, the run log, and export from a run to a release."""
