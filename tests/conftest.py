"""Shared pytest fixtures."""
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The read-only shared data folder (``$SPANLENS_DATA`` or ``../shared/data``)."""
    return Path(os.environ.get("SPANLENS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> Path:
    """A tiny random BERT (3 layers, 16 wide) with the packaged tokenizer, saved locally."""
    from tests.builders import tiny_bert

    return tiny_bert(tmp_path_factory.mktemp("backbone") / "tiny-bert", hidden=16)


def tiny_settings(data_dir: Path, backbone: Path, **overrides):
    """Settings of a seconds-long ``prepare`` on a slice of MAMS with the tiny backbone."""
    from core.prepare_settings import PrepareSettings

    values = dict(dataset="mams", data_dir=str(data_dir), model=str(backbone), train_limit=48, eval_limit=16,
                  epochs=3, batch_size=8, lr=1e-3, checkpoints=2, variants=3, max_length=64, device="cpu")
    values.update(overrides)
    return PrepareSettings(**values)


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory, data_dir, tiny_backbone) -> Path:
    """A prepared workspace with an exact (unprojected) gradient index; treat as read-only."""
    from core.index import IndexSettings
    from core.index_build import build_index
    from core.prepare import prepare
    from core.workspace import Workspace

    root = tmp_path_factory.mktemp("ws") / "tiny"
    prepare(tiny_settings(data_dir, tiny_backbone), root, progress=False, log=lambda _: None)
    build_index(Workspace(root), IndexSettings(dim=None, batch_size=8), progress=False, log=lambda _: None)
    return root
