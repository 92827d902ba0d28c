"""Two kinds of failure: the user's (message names the fix, CLI exits 2) and ours (a bug)."""


class DeployKitError(Exception):
    """A user-facing failure. The message is one line that says what to do."""

    exit_code = 2


class InternalError(RuntimeError):
    """A deploykit bug: an invariant broke. Never raised for bad user input."""


class TransportError(DeployKitError):
    """The measuring device cannot be reached or refuses the client (not the model): a long job stops here, with what
    it has written kept, instead of counting the model as rejected."""
