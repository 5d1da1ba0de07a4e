"""The architecture names cnnserve knows, without importing torch (the CLI and the gateway need them).

:mod:`cnnserve.models.registry` holds the builders; a test keeps the two in step.
"""

ARCHITECTURES = ("alexnet", "lenet")

__all__ = ["ARCHITECTURES"]
