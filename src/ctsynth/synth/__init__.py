"""Inference: mask -> CT for test cases (generate) and new labelled cases (synthesize)."""
