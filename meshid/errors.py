"""Named errors shared by both sides; each API maps them to its status codes in one place."""


class MeshidError(Exception):
    """Base class for every error meshid raises on purpose."""


class InvalidSpiffeIdError(MeshidError, ValueError):
    """A string is not a valid SPIFFE ID or trust domain."""


class InvalidSelectorError(MeshidError, ValueError):
    """A selector is not `type:value` with a known shape."""


class InvalidBundleError(MeshidError, ValueError):
    """A SPIFFE bundle document could not be decoded."""


class ConfigError(MeshidError, ValueError):
    """Configuration is wrong; the message names the file, key and reason."""


class NotFoundError(MeshidError, LookupError):
    """The referenced object does not exist."""


class AlreadyExistsError(MeshidError):
    """An object with the same identity already exists."""


class PermissionDeniedError(MeshidError):
    """The caller is known but not allowed to do this."""


class UnauthenticatedError(MeshidError):
    """The caller could not be identified."""


class AttestationError(MeshidError):
    """Node or workload attestation failed; the message never echoes secrets."""


class OverloadedError(MeshidError):
    """The server refuses work for now; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
