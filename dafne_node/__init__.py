"""Dafne Node: a DICOM node that segments lower-leg MRI and learns from corrections."""

__version__ = "0.1.0"
