"""Generated gRPC stubs (`make stubs`); the contract itself is proto/*.proto."""
