"""Test-wide environment: nothing downloads, widgets stay headless, kernels inherit both."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DMD2LAB_HEADLESS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
