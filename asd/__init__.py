"""anything-sync-daemon: keep chosen directories in RAM, write them back to disk safely."""

__version__ = "7.0.0"
