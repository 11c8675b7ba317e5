"""Folder: files into a local or mounted folder (handler.py) and its settings rules (validation.py).

Nothing is imported here: the proxy names these modules by dotted path."""
