"""Golden results (JSON, one file per platform), installed as ``flashverify.golden_files``.

Read and written only by :mod:`flashverify.golden` (``flashverify golden check|update``).
"""
