"""Training examples on disk: arrays and geometry, never a DICOM header.

A correction becomes an example the trainer process reads: the image volume, the corrected
label map, the pixel spacing, which label values the radiologist's SEG covered and which
slices changed. Nothing else: no names, IDs, dates or UIDs, so an example can be read,
copied or trained on without carrying patient identifiers. The local identifiers stay in
the node database (``corrections``), which names the file.

Files are NumPy ``.npz`` archives written to a temporary name, fsynced and renamed, and
read with ``allow_pickle=False``: an example is data, never code.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dafne_node.durable import write_atomically
from dafne_node.model.train import TrainingExample

__all__ = ["EXAMPLES_DIR", "ExampleStore", "StoredExample"]

EXAMPLES_DIR = "examples"
"""The examples' folder inside the node's data directory."""

_ARRAYS = ("pixels", "labels", "pixel_spacing", "label_values", "changed_slices")
"""Everything an example file holds: what a reviewer of the file may expect to find."""


@dataclass(frozen=True)
class StoredExample:
    """An example as the trainer reads it.

    Attributes
    ----------
    example:
        Image volume, label map and pixel spacing.
    label_values:
        The label values the correction covered; other values in ``labels`` come from the
        node's own SEG, which the radiologist left as it was.
    changed_slices:
        Slices where the correction differs from the node's SEG.
    """

    example: TrainingExample
    label_values: tuple[int, ...]
    changed_slices: tuple[int, ...]


class ExampleStore:
    """The folder of examples under a node's data directory.

    Parameters
    ----------
    data_dir:
        The node's data directory; examples live in ``data_dir/examples``.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.folder = data_dir / EXAMPLES_DIR

    def save(self, example: TrainingExample, *, label_values: list[int],
             changed_slices: list[int]) -> str:
        """Write ``example`` under a random name; its path relative to the data directory."""
        name = f"{uuid.uuid4().hex}.npz"
        write_atomically(self.folder / name, lambda stream: np.savez_compressed(
            stream,
            pixels=np.asarray(example.pixels, dtype=np.float32),
            labels=np.asarray(example.labels, dtype=np.uint8),
            pixel_spacing=np.asarray(example.pixel_spacing, dtype=np.float64),
            label_values=np.asarray(label_values, dtype=np.int32),
            changed_slices=np.asarray(changed_slices, dtype=np.int32),
        ))
        return f"{EXAMPLES_DIR}/{name}"

    def load(self, relative: str) -> StoredExample:
        """Read an example written by :meth:`save`.

        Raises
        ------
        FileNotFoundError
            If the file is gone.
        ValueError
            If it is not an example file (other arrays, pickled objects).
        """
        with np.load(self.path(relative), allow_pickle=False) as archive:
            if sorted(archive.files) != sorted(_ARRAYS):
                raise ValueError(f"{relative} is not an example file (holds {archive.files})")
            spacing = archive["pixel_spacing"]
            return StoredExample(
                example=TrainingExample(pixels=archive["pixels"], labels=archive["labels"],
                                        pixel_spacing=(float(spacing[0]), float(spacing[1]))),
                label_values=tuple(int(v) for v in archive["label_values"]),
                changed_slices=tuple(int(v) for v in archive["changed_slices"]),
            )

    def delete(self, relative: str) -> None:
        """Remove an example file (retention); a file already gone is no error."""
        self.path(relative).unlink(missing_ok=True)

    def path(self, relative: str) -> Path:
        """The example's absolute path; refuses names that leave the examples folder."""
        path = (self.data_dir / relative).resolve()
        if path.parent != self.folder.resolve():
            raise ValueError(f"{relative!r} is not in the examples folder")
        return path

