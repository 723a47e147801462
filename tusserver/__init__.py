"""tusserver: a resumable upload server (tus 1.0.0) for very large files."""

__version__ = "0.1.0"
