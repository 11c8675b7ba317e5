"""DICOM status codes in words: one table for C-STORE, C-FIND, C-MOVE, C-GET, C-ECHO
and the STOW-RS failure and warning reasons.

The same code means slightly different things per service (0xB000 is "coercion of
data elements" for a C-STORE but "sub-operations complete with one or more failures"
for a C-MOVE or C-GET), so a lookup names the service. Sources: PS3.7 Annex C
(general statuses), PS3.4 B.2.3 (Storage), C.4.1.1.4 (C-FIND), C.4.2.1.5 (C-MOVE),
C.4.3.1.4 (C-GET), PS3.18 10.5.3 (STOW-RS failure and warning reasons, which reuse
the Storage codes). Protocol code: no models, no settings.
"""

from __future__ import annotations

from typing import Literal

Service = Literal["store", "find", "move", "get", "echo", "stow"]

SUCCESS, WARNING, FAILURE, CANCEL, PENDING = (
    "success",
    "warning",
    "failure",
    "cancel",
    "pending",
)

# PS3.7 C: statuses any DIMSE service may answer.
GENERAL = {
    0x0000: "success",
    0x0105: "no such attribute",
    0x0106: "invalid attribute value",
    0x0107: "attribute list error",
    0x0110: "processing failure",
    0x0111: "duplicate SOP instance",
    0x0112: "no such SOP instance",
    0x0116: "attribute value out of range",
    0x0117: "invalid SOP instance",
    0x0118: "no such SOP class",
    0x0119: "SOP class and instance do not match",
    0x0120: "missing attribute",
    0x0121: "missing attribute value",
    0x0122: "SOP class not supported",
    0x0123: "no such action",
    0x0124: "refused: not authorised",
    0x0210: "duplicate invocation",
    0x0211: "unrecognised operation",
    0x0212: "mistyped argument",
    0x0213: "resource limitation",
    0xC122: "transfer syntax not supported",
    0xFE00: "cancelled",
    0xFF00: "pending",
}

# Per service: exact codes first, then ranges (low, high, words).
_STORE = {
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}
_STORE_RANGES = [
    (0xA700, 0xA7FF, "refused: out of resources"),
    (0xA900, 0xA9FF, "data set does not match SOP class"),
    (0xC000, 0xCFFF, "cannot understand"),
]
_QUERY = {
    0xA700: "refused: out of resources",
    0xA900: "identifier does not match SOP class",
    0xFF01: "pending (optional keys not supported)",
    0xFE00: "matching terminated: cancelled",
}
_RETRIEVE = {
    0xA701: "refused: out of resources (unable to calculate the number of matches)",
    0xA702: "refused: out of resources (unable to perform sub-operations)",
    0xA801: "refused: move destination unknown (the source does not know that AE "
    "title)",
    0xA900: "identifier does not match SOP class",
    0xAA00: "none of the frames requested were found",
    0xB000: "sub-operations complete with one or more failures or warnings",
    0xFE00: "sub-operations terminated: cancelled",
}
_QUERY_RANGES = [(0xC000, 0xCFFF, "unable to process")]

_TABLES: dict[str, tuple[dict[int, str], list[tuple[int, int, str]]]] = {
    "store": (_STORE, _STORE_RANGES),
    "stow": (_STORE, _STORE_RANGES),
    "echo": ({}, []),
    "find": (_QUERY, _QUERY_RANGES),
    "move": (_RETRIEVE, _QUERY_RANGES),
    "get": (_RETRIEVE, _QUERY_RANGES),
}


def category(code: int) -> str:
    """success, warning, failure, cancel or pending (PS3.7 C.1-C.5)."""
    if code == 0x0000:
        return SUCCESS
    if code in (0xFF00, 0xFF01):
        return PENDING
    if code == 0xFE00:
        return CANCEL
    if code in (0x0001, 0x0107, 0x0116) or 0xB000 <= code <= 0xBFFF:
        return WARNING
    return FAILURE


def meaning(code: int, service: Service = "store") -> str:
    """What `code` means for `service`, in words (without the code)."""
    exact, ranges = _TABLES[service]
    if code in exact:
        return exact[code]
    for low, high, words in ranges:
        if low <= code <= high:
            return words
    if code in GENERAL:
        return GENERAL[code]
    return f"unknown {category(code)} status"


def in_words(code: int, service: Service = "store", comment: str = "") -> str:
    """`meaning (0xA700)`, with the peer's Error Comment after a colon if any."""
    words = f"{meaning(code, service)} (0x{code:04X})"
    return f"{words}: {comment}" if comment else words
