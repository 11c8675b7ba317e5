"""DICOM+TLS: the DICOM handler over mutual TLS (handler.py), its SSL context (context.py) and settings rules (validation.py).

Nothing is imported here: the proxy names these modules by dotted path."""
