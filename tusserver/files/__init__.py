"""Bytes on disk: one file per upload under the data directory."""
