"""The cruzflow server: engine, checkpoint store and gRPC transport."""
