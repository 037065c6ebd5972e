"""Evaluation: metrics, intervals, feature spaces, privacy, utility."""
