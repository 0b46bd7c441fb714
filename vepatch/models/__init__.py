"""Base models and what vepatch knows about them:

  load.py     load a model by reference, offline; fingerprints; the device to run on
  default.py  the embedded default base, built once from two PyPI packages (METHODS.md §7)
  towers.py   per-architecture module names: fc1, Q/K/V heads, projection, norms
  heads.py    zero-shot text heads (class names x templates), cached on disk
"""

from .load import LoadedModel, fingerprint, load_model, resolve_device, text_fingerprint

__all__ = ["LoadedModel", "fingerprint", "load_model", "resolve_device", "text_fingerprint"]
