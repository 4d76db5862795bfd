"""The one error the embedded servers raise."""


class EmbeddedServerError(RuntimeError):
    """A throwaway server could not be found, started, stopped or controlled."""
