"""Fixtures shared by test files."""
import pytest

from dmd2lab.image_metrics import InceptionFeatures, inception_path


@pytest.fixture(scope="module")
def inception():
    try:
        inception_path()
    except FileNotFoundError as error:
        pytest.skip(f"FID Inception file absent: {error}")
    return InceptionFeatures()
