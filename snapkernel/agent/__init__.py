"""Runs inside a sandbox: starts the kernel and bridges it to the backend over stdio frames."""
