"""Errors a user can act on: each says which input, where, and what was expected."""


class XanesdiffInputError(ValueError):
    """Bad user input (file, field or value). The message names the source and the expectation."""

    def __init__(self, message: str, source: str | None = None):
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)


class MissingAssetError(FileNotFoundError):
    """A model or dataset that is not on disk; the message says where we looked and how to get it."""
