"""Plain helpers shared by several test files (fixtures live in ``tests/conftest.py``): no test file imports
another. One module per subject, so a light test never imports torch or TRL through a heavy one's helpers."""
