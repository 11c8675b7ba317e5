"""DICOM value representations, for the hand-written element walker.

One walker reads element headers without pydicom (`targets.dicomnet.check`): the
receiver's check of every received dataset, the check before every send, the scan
of a series folder and the folder index's header reader. This is its table
(PS3.5 6.2, 7.1.2); a test holds it against pydicom's.
"""

from __future__ import annotations

# Explicit VRs whose element header has 2 reserved bytes and a 4-byte length.
LONG_VRS = frozenset(
    {
        b"OB",
        b"OD",
        b"OF",
        b"OL",
        b"OV",
        b"OW",
        b"SQ",
        b"SV",
        b"UC",
        b"UN",
        b"UR",
        b"UT",
        b"UV",
    }
)

# Every VR; the others have a 2-byte length.
ALL_VRS = LONG_VRS | frozenset(
    {
        b"AE",
        b"AS",
        b"AT",
        b"CS",
        b"DA",
        b"DS",
        b"DT",
        b"FL",
        b"FD",
        b"IS",
        b"LO",
        b"LT",
        b"PN",
        b"SH",
        b"SL",
        b"SS",
        b"ST",
        b"TM",
        b"UI",
        b"UL",
        b"US",
    }
)
