"""The HTML curation report: its writer and its self-contained building blocks."""
