"""gRPC transport: converts messages and maps errors, nothing more."""
