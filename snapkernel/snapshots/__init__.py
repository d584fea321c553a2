"""Snapshots of kernels: the store (catalog and files); memory and state snapshots build on it."""
