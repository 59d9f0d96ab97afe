"""Tandem's tests, laid out like services/; helpers shared between them are in tests/support/."""
