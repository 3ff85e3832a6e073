"""The one exception type users see: a problem with their input, told in one line."""


class UserError(Exception):
    """Bad config value, missing or corrupt data, broken checkpoint.

    The entry point prints ``error: <message>`` and exits with status 2; the message must name
    the culprit (a config key, a path) and say what would be accepted.
    """
