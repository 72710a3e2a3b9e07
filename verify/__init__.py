"""flashverify: numerical verification harness for attention kernels."""

__version__ = "0.1.0"
