"""Small shared helpers (atomic file writes)."""

from .io import atomic_dir, atomic_save_torch, atomic_write_bytes, atomic_write_json, atomic_write_text, fsync_dir

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_save_torch", "atomic_dir", "fsync_dir"]
