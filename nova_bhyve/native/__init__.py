"""The native migration engine (C, loaded through cffi)."""
