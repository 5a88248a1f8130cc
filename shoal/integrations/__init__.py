"""Integrations with other tools, each an optional extra imported on its own.

* :mod:`shoal.integrations.mlflow` (``pip install shoal[mlflow]``): serve MLflow
  pyfunc models from the registry, runs or paths, and follow a registry alias
  with shadow/canary rollouts recorded in a history. Guide: ``docs/registry.md``.

Importing this package imports none of those tools.
"""
