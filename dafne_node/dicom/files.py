"""Writing DICOM files so that no reader ever sees half of one.

A SEG dropped in a PACS import folder or a viewer's watch folder may be picked
up the moment its name appears; writing to a temporary name, fsyncing and then
renaming makes it appear whole or not at all.
"""

from __future__ import annotations

from pathlib import Path

from pydicom import Dataset

from dafne_node.durable import write_atomically


def save_dataset_atomically(dataset: Dataset, path: Path) -> None:
    """Write ``dataset`` as a DICOM file at ``path``, atomically and durably."""
    write_atomically(path, lambda stream: dataset.save_as(stream, enforce_file_format=True))
