"""The cache of backbone outputs: the store, its shard files, their checks and the passes that fill it."""
