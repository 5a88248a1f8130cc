"""Runnable shoal examples: composition, pipeline and ensemble.

Each module defines a module-level ``app`` (a bound application) and runs a
short HTTP demo when executed, e.g. ``python -m examples.composed``.
``examples.demo`` serves all three at once.
"""
