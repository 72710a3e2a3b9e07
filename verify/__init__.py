"""flashverify: numerical verification harness for attention kernels."""

__version__ = "0.1.0"

# Implementations known by name (--attn-impl NAME); anything else is 'package.module:callable'.
BUILTIN_IMPLEMENTATIONS = ("flashverify", "naive", "sdpa-math", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn",
                           "flex")
