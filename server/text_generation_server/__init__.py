"""Model shards: checkpoint loading, the native InternLM2/Llama models and the paged-KV engine."""
