"""Kernels: each op has an eager reference (the released formula) and a fused path."""
