"""The property suite (hypothesis) that the pytest plugin points at any attention implementation.

``flashverify.properties.strategies`` holds the strategies; ``test_properties`` the
properties, run with ``pytest --pyargs flashverify.properties --attn-impl=module:callable``.
"""
