"""Helpers of benchmarks/compare_qemu.py: this project's engine against QEMU."""
