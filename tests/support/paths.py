"""Where the tests find the checkout, their C programs and their data files."""

from __future__ import annotations

from pathlib import Path

SUPPORT = Path(__file__).resolve().parent
CHECKOUT = SUPPORT.parent.parent
C_SOURCES = SUPPORT / "c"
DATA = SUPPORT / "data"
