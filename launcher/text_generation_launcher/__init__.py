"""The launcher: prepares weights, spawns shards and the router. Not built yet."""
