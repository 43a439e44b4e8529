"""gRPC stubs generated from ``protocols/proto/`` by ``python -m potluck.protocols.generate``.

Do not edit: regenerate instead (``tests/test_generated_stubs.py`` checks they are up to date).
"""
