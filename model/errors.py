"""The one error type users see: kept in its own module so the CLI can catch it without importing pydantic."""


class ConfigError(ValueError):
    """A config or override the user typed is wrong; the message says what and what is allowed."""
