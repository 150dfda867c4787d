"""Comma-separated choices on a bench script's command line (``--configs a,b``), checked in one line."""

from __future__ import annotations

import sys
from collections.abc import Iterable


def chosen(text: str, known: Iterable[str], flag: str) -> list[str]:
    """The names in ``text``; an unknown one ends the script with ``error: FLAG: unknown ... (choose from ...)``."""
    known = list(known)
    names = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in known]
    if unknown:
        sys.exit(f"error: {flag}: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
    return names
