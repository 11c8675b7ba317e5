"""The in-process dispatch fixtures, for the outsider's tests here too."""

from tests.dispatch.conftest import immediate_huey  # noqa: F401
