"""The one user-error type: the CLI prints it as `error: ...` and exits with code 2."""


class UserError(Exception):
    """A problem with the user's input (config, paths, devices), not a bug in llm-jax."""
