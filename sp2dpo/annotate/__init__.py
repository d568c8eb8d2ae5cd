"""Stage: annotate."""
