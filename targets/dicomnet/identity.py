"""How Courier introduces itself on the DICOM network and in the files it writes.

Peers apply per-implementation workarounds by the Implementation Class UID and
Version Name an association request or acceptance carries (PS3.7 D.3.3.2-3), and
every Part 10 file names the implementation that wrote it (PS3.10 7.1). Courier
uses its own, never the library's: the UID is a `2.25.` UUID-derived UID made once
for Courier and never changed; the version name follows the release.
"""

from __future__ import annotations

from importlib import metadata

# PS3.5 B.2: 2.25.<the decimal value of a UUID>; made once with uuid4().
IMPLEMENTATION_CLASS_UID = "2.25.196818164412999291665502332740492829816"


def _version() -> str:
    try:
        return metadata.version("courier")
    except metadata.PackageNotFoundError:  # run from a checkout never installed
        return "0"


# At most 16 characters (SH in the file meta, PS3.7 D.3.3.2.2 on the wire).
IMPLEMENTATION_VERSION_NAME = f"COURIER_{_version()}"[:16]
