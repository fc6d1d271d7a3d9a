"""The one exception type of ``falqon-export``: a bad input or an artefact the target cannot express.

Every message names the thing, the value and the fix (docs/style.md §5); the CLI prints it as one line and exits
non-zero.
"""

from __future__ import annotations


class ExportError(ValueError):
    """Export refused: bad input (path, checkpoint, tokenizer, target) or a layer the target cannot express."""
