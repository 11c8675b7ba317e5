"""XNAT: sessions imported into a project (handler.py), their labels (labels.py) and its settings rules (validation.py).

Nothing is imported here: the proxy names these modules by dotted path."""
