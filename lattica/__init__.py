"""Lattica: a peer-to-peer networking daemon for distributed AI work."""

__version__ = "0.1.0"
