"""The shape of the code that the design promises: what imports what."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_runtime_module_imports_the_phantom_generator() -> None:
    """The phantom is development and test tooling; a node in a hospital never loads it."""
    runtime = ["dafne_node.app.node", "dafne_node.app.cli", "dafne_node.inference.segment",
               "dafne_node.jobs.runner", "dafne_node.inference.deliver",
               "dafne_node.inference.assemble", "dafne_node.api", "dafne_node.inference.segmenter",
               "dafne_node.learning.corrections", "dafne_node.learning.training",
               "dafne_node.retention", "dicom_scp", "db"]
    probe = (f"import sys; import {', '.join(runtime)}; "
             "print([m for m in sys.modules if m.startswith('dafne_node.phantom')])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_the_model_package_needs_no_dicom_and_no_database() -> None:
    """The federation server imports the model package: no DICOM I/O, no node database."""
    probe = ("import sys; import dafne_node.model, dafne_node.learning.finetune, "
             "dafne_node.learning.delta, dafne_node.learning.update, federation.aggregate, "
             "federation.strategies; print(sorted({m.split('.')[0] if not "
             "m.startswith('dafne_node.') else '.'.join(m.split('.')[:2]) for m in sys.modules "
             "if m.split('.')[0] in {'highdicom', 'sqlalchemy', 'db', 'dicom_scp'} or "
             "m.startswith(('dafne_node.dicom', 'dafne_node.app', 'dafne_node.inference', "
             "'dafne_node.phantom'))}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout
