"""Step semantics, retries, replay and status: no grpc, no database driver here."""
