"""The backend daemon: sandboxes, scheduling, snapshots, fan-out, served over gRPC."""
