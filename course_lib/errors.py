"""The package's own errors: raised on purpose, each with a message that names the setting and what is allowed.

Every error the package raises deliberately derives from :class:`CourseError`, so a caller (the
CLI first of all, ``python -m course_lib``) can tell "you asked for something that cannot be
done" from a bug: the first is worth one line on stderr, the second a traceback. Each subclass
also derives from the built-in exception it used to be, so ``except ValueError`` and
``except OSError`` written against earlier versions keep working.

This module imports nothing, so that ``course_lib.__init__`` and the CLI can use it before torch.
"""


class CourseError(Exception):
    """Base of every error ``course_lib`` raises on purpose; its message is meant for the user as it is."""


class SettingError(CourseError, ValueError):
    """An input (an argument, a config field, a CLI flag, a file the user wrote) the model or the package cannot take.

    ``setting``, when given, is the name the message starts with (``"layers"`` for "layers=40
    ..."), so that the CLI can say it as its flag (``--layers=40 ...``).
    """

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting
