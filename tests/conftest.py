"""Test configuration: every module in tests/fixtures/ is a pytest plugin.

Peers (Orthanc, storescp, sshd, SeaweedFS, Redis, ...) are started once per session by
the fixtures there, on free loopback ports. A peer that cannot start fails the tests
that need it, loudly: nothing is skipped.
"""

from pathlib import Path

pytest_plugins = sorted(
    f"tests.fixtures.{p.stem}"
    for p in (Path(__file__).parent / "fixtures").glob("*.py")
    if p.stem != "__init__"
)
