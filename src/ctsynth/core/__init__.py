"""Foundations: configuration, errors, file I/O, labels, devices, the stage runner, MLflow."""
