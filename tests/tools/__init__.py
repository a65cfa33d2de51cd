"""Helpers for running and measuring the test suite (not tests themselves)."""
