"""Where it runs: Ray actors, the coordinator, checkpoints, metrics and the CLI's job commands."""
