"""The one base of the toolkit's errors (imports nothing from the project: every layer may use it).

:class:`IMSVDError` marks a problem with the user's input or environment: a bad config value
or override, a missing or unreadable file, a dataset too small for the batch, a checkpoint of
the wrong kind, a run folder in use, a training run that diverged. Every error class of the
toolkit that denotes such a problem derives from it (most also from ``ValueError`` or
``RuntimeError``, the kind of error they are), and the command lines catch ``IMSVDError`` and
nothing broader: it is printed as one ``error: ...`` line and the command exits with status 2.
Any other exception (``ValueError`` from numpy, ``KeyError``, ...) is a bug and keeps its
traceback.

Library code raises the specific class of its layer (``ConfigError``, ``DataError``,
``CheckpointError``, ...), never ``IMSVDError`` itself; an argument check that only code can
fail (a tensor shape, an internal mode) stays a plain ``ValueError``.
"""

from __future__ import annotations

__all__ = ["IMSVDError"]


class IMSVDError(Exception):
    """A problem with the user's input or environment, not a bug in the toolkit.

    The command lines report it as one line (``error: <message>``) and exit with status 2; the
    message says what is wrong and, where it can, which config key, file or flag to change.
    """
