"""evl-platform: train, sweep and report EVL video models (frozen CLIP + temporal decoder)."""

__version__ = "0.1.0"
