"""Equinox layers built on `fixpoint` and `solvers` (filled by later work)."""
