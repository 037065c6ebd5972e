"""Reporting: the HTML report, its figures and headline sentences."""
