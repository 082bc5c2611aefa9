"""Sizes as people type them: bytes with a unit (`50G`), images as WIDTHxHEIGHT (`1024x512`) and durations
(`10m`, `90s`, `1h30m`)."""

from __future__ import annotations

import re

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


DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([hms]?)")


def parse_duration(text: str | float, what: str = "duration") -> float:
    """'10m', '90s', '1h', '1h30m', '45' (seconds) -> seconds, > 0."""
    t = str(text).strip().lower().replace(" ", "")
    parts = DURATION_PART.findall(t)
    # a bare number only as the whole string: "1h30" is refused, not read as 1 h 30 s
    if t and "".join(n + u for n, u in parts) == t and (len(parts) == 1 or all(u for _, u in parts)):
        seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1, "": 1}[u] for n, u in parts)
        if seconds > 0:
            return seconds
    raise UserError(f"{what}: bad duration {text!r}: use seconds or a number with s, m or h, e.g. 90s, 10m, "
                    "1h30m")
