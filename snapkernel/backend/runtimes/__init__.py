"""Sandbox runtimes: `process` (plain subprocess) and `gvisor` (runsc), found through the `snapkernel.runtimes`
entry-point group (pyproject.toml)."""
