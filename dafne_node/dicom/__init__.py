"""DICOM in and out: image series into volumes, DICOM-SEG for PACS and from any viewer.

Nothing here knows of jobs, the database or training.
"""
