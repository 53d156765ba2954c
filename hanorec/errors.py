"""The one base class of the mistakes a user can fix (a bad key or value, a missing file, unusable data).

Every such error of the package derives from UserError and says what is wrong in one sentence; the CLI
prints it and exits with status 2, the app shows it on the page. Anything else is a bug.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave (configuration, data, files, a request): one sentence."""
