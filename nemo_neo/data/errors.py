"""User errors of the indexed-data layer: each message names the problem and the fix.

`DataError` is a ValueError so that callers that already catch ValueError keep working; when the
package gains its common user-error base (issue 13) it only needs to be added as a second base here.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input (blend, split, dataset files, tokenizer mismatch, too little text)."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file or prefix (.bin / .idx) that should exist does not."""
