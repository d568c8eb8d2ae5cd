"""Stage 0: the canonical pairs table (loaders, validation, quarantine, bundled data)."""
