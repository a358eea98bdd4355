"""Fixtures shared across the test suite: phantom studies on disk."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from dafne_node.phantom import PhantomStudy, make_study
from dafne_node.phantom.study import StudyFiles, write_study


@dataclass(frozen=True)
class WrittenStudy:
    """A phantom in memory and the files written for it."""

    study: PhantomStudy
    files: StudyFiles

    @property
    def folder(self) -> Path:
        return self.files.truth.parent


def write_phantom(folder: Path, site: str = "A", seed: int = 0, slices: int = 40,
                  matrix: int | None = None) -> WrittenStudy:
    study = make_study(site=site, seed=seed, slices=slices, matrix=matrix)
    return WrittenStudy(study, write_study(study, folder))


@pytest.fixture(scope="session")
def small_study(tmp_path_factory: pytest.TempPathFactory) -> WrittenStudy:
    """A quick 12-slice site-A phantom at 128x128 for format tests."""
    return write_phantom(tmp_path_factory.mktemp("small"), seed=3, slices=12, matrix=128)


@pytest.fixture(scope="session")
def heldout_study(tmp_path_factory: pytest.TempPathFactory) -> WrittenStudy:
    """A full-size 40-slice site-A phantom whose seed the default model never saw."""
    return write_phantom(tmp_path_factory.mktemp("heldout"), seed=7, slices=40)
