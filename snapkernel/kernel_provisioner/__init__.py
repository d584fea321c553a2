"""The `snapkernel` kernel provisioner, its local relay, and kernelspec installation."""

from snapkernel.kernel_provisioner.provisioner import SnapKernelProvisioner

__all__ = ["SnapKernelProvisioner"]
