"""Sizes as people type them: bytes with a unit (`50G`) and images as WIDTHxHEIGHT (`1024x512`)."""

from __future__ import annotations

from distseg.errors import UserError


def parse_bytes(text: str | int, what: str = "size") -> int:
    """'1G', '60K', '123' -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = str(text).strip().lower().rstrip("b")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except (ValueError, IndexError):
        raise UserError(f"{what}: bad size {text!r}: use bytes or a number with K, M, G or T") from None


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
