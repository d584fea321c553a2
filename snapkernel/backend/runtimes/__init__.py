"""Sandbox runtimes: `process` (plain subprocess) and, later, `gvisor` (runsc)."""
