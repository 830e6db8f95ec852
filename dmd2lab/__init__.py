"""dmd2lab: a small, exact, hackable DMD2 (Yin et al. 2024, arXiv 2405.14867) for teaching and research."""
__version__ = "0.1.0"
