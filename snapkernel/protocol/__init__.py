"""What both sides of the gRPC link share: the generated code (`v1`), the frame format, the lifecycle states,
spec parsing and units, where the backend listens and how calls authenticate, fan-out's wire format.

The bottom layer: it imports nothing of snapkernel but `snapkernel.errors` (the contract in pyproject.toml).
"""
