"""Writing DICOM files so that no reader ever sees half of one.

A SEG dropped in a PACS import folder or a viewer's watch folder may be picked
up the moment its name appears; writing to a temporary name, fsyncing and then
renaming makes it appear whole or not at all.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from pydicom import Dataset


def save_dataset_atomically(dataset: Dataset, path: Path) -> None:
    """Write ``dataset`` as a DICOM file at ``path``, atomically and durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            dataset.save_as(stream, enforce_file_format=True)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
