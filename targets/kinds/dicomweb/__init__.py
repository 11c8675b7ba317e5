"""DICOMweb: STOW-RS sending (handler.py), QIDO-RS/WADO-RS querying (query.py), a file:// URL's local folder (local.py, index.py) and settings rules (validation.py).

Nothing is imported here: the proxy names these modules by dotted path."""
