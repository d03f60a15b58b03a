"""User-facing errors: the CLI prints their message as one line and exits non-zero, no traceback."""


class SegBookError(Exception):
    """Base of every error a user can act on; the message names the file or input and the problem."""


class InputError(SegBookError, ValueError):
    """Bad input: unreadable image, wrong dimensionality, ROI outside the image, unknown class..."""


class Cancelled(SegBookError):
    """The user (Ctrl-C, the Slicer Cancel button) stopped the work; nothing was written."""
