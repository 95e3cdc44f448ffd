"""Shared pytest fixtures."""
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The read-only shared data folder (``$SPANLENS_DATA`` or ``../shared/data``)."""
    return Path(os.environ.get("SPANLENS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
