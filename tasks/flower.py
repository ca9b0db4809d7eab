"""``refgen flower``: Flower, started only with credentials that really close it.

Flower 2.2 takes ``FLOWER_BASIC_AUTH`` as it is: an empty value becomes one empty credential,
and a header whose base64 decodes to nothing (``Basic !``, ``Basic ====``) matches it, so a
Flower started with ``FLOWER_BASIC_AUTH=`` served everyone, including the API that starts
tasks (paid work). A ``user:`` credential is matched by ``Basic dXNlcjo=`` the same way. So
every credential must have a non-empty user and a non-empty password, or Flower does not
start (exit 5, one line); credentials on the command line are refused (they would bypass the
check and show in ``ps``).
"""

from __future__ import annotations

from tasks import exit_codes
from worker.errors import ConfigurationError
from worker.settings import Settings

_AUTH_OPTIONS = ("--basic_auth", "--basic-auth", "--auth", "--unauthenticated_api")


def check_credentials(settings: Settings, flower_args: list[str]) -> None:
    """Raise ``ConfigurationError`` unless ``FLOWER_BASIC_AUTH`` holds only ``user:password``
    pairs with both parts non-empty. The message never holds a password."""
    for arg in flower_args:
        option = arg.split("=", 1)[0]
        if option in _AUTH_OPTIONS:
            raise ConfigurationError(
                f"refgen flower takes its credentials from FLOWER_BASIC_AUTH, not {option}"
            )
    if settings.flower_unauthenticated_api:
        raise ConfigurationError("FLOWER_UNAUTHENTICATED_API=true opens Flower's API to anyone")
    if settings.flower_basic_auth is None:
        raise ConfigurationError(
            "FLOWER_BASIC_AUTH is required: user:password (several: comma-separated), "
            "both non-empty"
        )
    for position, credential in enumerate(
        settings.flower_basic_auth.get_secret_value().split(","), start=1
    ):
        user, colon, password = credential.partition(":")
        if not colon or not user.strip() or not password.strip():
            raise ConfigurationError(
                f"FLOWER_BASIC_AUTH credential #{position} must be user:password with both "
                "non-empty (an empty one lets any request in)"
            )


def run_flower(settings: Settings, flower_args: list[str]) -> int:
    check_credentials(settings, flower_args)
    from tasks.app import app

    # Flower reads FLOWER_BASIC_AUTH from the environment itself: the value just checked.
    app.start(["flower", *flower_args])
    return exit_codes.RESULT
