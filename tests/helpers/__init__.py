"""What several test modules share: tiny modules and fixed batches, shard writers, tiny scorer models,
the overrides of a fast training run. No test module imports another; they import from here."""
