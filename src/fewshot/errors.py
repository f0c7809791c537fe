"""User-facing errors.

Anything a user can cause (a missing path, an unreadable image, a class with too few images, a checkpoint
of another method) raises :class:`FewshotError` with a one-line message. The CLI prints that line and
exits non-zero; it never shows a traceback for these.
"""


class FewshotError(Exception):
    """An error caused by input the user gave; its message is meant to be read by that user."""
