"""Runtime data: the token-shard format and readers the trainer memory-maps."""
