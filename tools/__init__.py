"""Offline tools, each with its CLI: shard preparation, feature caching, pretraining the shapes base."""
