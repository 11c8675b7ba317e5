"""System checks for the receiver's settings (run at start-up by every command)."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, register


@register()
def check_commitment_peers(app_configs, **kwargs):
    """courier.E020: COURIER_RECEIVER_COMMITMENT_PEERS is a list of AET=host:port."""
    # Here, not at the top: this module loads at every django.setup().
    from .commitment import parse_peers

    try:
        parse_peers(settings.COURIER_RECEIVER_COMMITMENT_PEERS)
    except ValueError as exc:
        return [
            Error(
                f"COURIER_RECEIVER_COMMITMENT_PEERS: {exc}.",
                hint="Comma-separated AET=host:port entries, e.g. "
                "CT1=10.0.0.5:104,MR2=mr2.example.org:11112.",
                id="courier.E020",
            )
        ]
    return []
