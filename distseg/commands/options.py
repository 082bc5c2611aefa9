"""Option parsers shared by several commands: sizes in bytes and WIDTHxHEIGHT."""

from __future__ import annotations

from distseg.config import parse_bytes  # noqa: F401  (re-exported for the commands)
from distseg.errors import UserError


def parse_wxh(text: str | None) -> tuple[int, int] | None:
    """'1024x512' -> (1024, 512); None or '' -> None."""
    if not text:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if w > 0 and h > 0:
            return w, h
    except ValueError:
        pass
    raise UserError(f"bad size {text!r}: use WIDTHxHEIGHT, e.g. 1024x512")
