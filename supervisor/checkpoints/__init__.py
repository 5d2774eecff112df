"""Checkpoint folders: inspect (completeness, ownership), plan (retention), delete (symlink-safe)."""
