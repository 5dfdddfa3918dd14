"""What the router and the shards both import, and nothing else: the gRPC stubs generated from proto/*.proto
(`pb`) and the tokenizer (`tokenizer`). Neither imports torch, so the router's processes never load it."""
