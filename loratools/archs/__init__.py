"""Architectures: module-name maps of known base models."""
