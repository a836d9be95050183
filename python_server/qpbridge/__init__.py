"""qpbridge: a ZeroMQ bridge between QuPath and deep-learning models for H&E histology.

Importing the package is cheap: torch, OpenCV and the models load on first use.
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1

__all__ = ["PROTOCOL_VERSION", "__version__"]
