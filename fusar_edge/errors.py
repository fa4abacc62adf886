"""User-facing errors.

Anything the user can fix (a bad file, a wrong field, a missing weight) raises a
``FusarError`` whose message names the file, field or value and what was expected.
The CLI prints it as one line and exits with code 2; other exceptions are bugs and
keep their traceback.
"""


class FusarError(Exception):
    """An error caused by input the user can fix."""


class InputError(FusarError):
    """A bad image, anchor file or command-line value."""


class AnchorError(InputError):
    """A malformed or unusable anchor set."""


class MissingAnchorsError(AnchorError):
    """A bundle that applies TLM was asked without anchors, tiles or ``no_anchors`` (each front end
    says in its own words how to give them)."""


class CoverageError(AnchorError):
    """A footprint the tile store holds no AEF data for (``allow_empty_anchors`` answers it without)."""


class BundleError(FusarError):
    """A missing, incomplete or inconsistent model bundle or checkpoint."""


class DivergedError(FusarError):
    """A training loss that is no longer finite: stopped before the step that would spread it into the
    weights (the last checkpoint stays as it was); a lower learning rate is the usual cure."""
