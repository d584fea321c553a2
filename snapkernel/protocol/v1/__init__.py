"""Generated from protos/snapkernel/v1/backend.proto; do not edit."""
