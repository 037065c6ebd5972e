"""Sharing synthetic data: expert review decisions, the review web page, the share stage and its card."""
