"""The crash-at-step-47 demo: ``intentd demo``."""
