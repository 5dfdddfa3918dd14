"""The router: continuous batching and the client APIs (HTTP, OpenAI, gRPC). Not built yet."""
