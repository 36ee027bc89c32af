"""zeroseg: a CLIP crop-feature cache and a fast ZeroSeg student trainer."""

__version__ = "0.1.0"
