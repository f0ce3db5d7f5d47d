"""diffgen plugin for Nunchaku SVDQuant checkpoints; the hooks are in ``plugin``."""
