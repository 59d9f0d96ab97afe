"""Helpers the tests share: test-side clients, inference helpers, real-process clusters.

Fixtures stay in tests/conftest.py; this package holds plain functions and classes, and no tests.
"""
