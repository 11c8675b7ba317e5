"""DICOM: C-STORE sending (handler.py) and C-FIND/C-GET/C-MOVE querying (query.py).

Nothing is imported here: the proxy names these modules by dotted path."""
