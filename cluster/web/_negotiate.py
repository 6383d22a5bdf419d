"""``Accept`` header negotiation with q-values (RFC 9110 §12.5.1)."""

from __future__ import annotations

import re

__all__ = ["choose"]

_QVALUE = re.compile(r"(?:0(?:\.[0-9]{0,3})?|1(?:\.0{0,3})?)")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _ranges(header: str) -> list[tuple[str, str, float]]:
    """The media ranges of an ``Accept`` value as (type, subtype, q); malformed ones
    are skipped (a client that cannot spell a range does not get to veto the rest)."""
    out = []
    for item in header.split(","):
        media, *params = item.split(";")
        kind, sep, sub = media.strip().lower().partition("/")
        if not sep or not _TOKEN.fullmatch(kind) or not _TOKEN.fullmatch(sub):
            continue
        if kind == "*" and sub != "*":
            continue
        q = 1.0
        for param in params:
            pname, _, value = param.strip().partition("=")
            if pname.strip().lower() == "q":
                value = value.strip()
                q = float(value) if _QVALUE.fullmatch(value) else -1.0
        if q >= 0:
            out.append((kind, sub, q))
    return out


def choose(header: str | None, offers: tuple[str, ...]) -> str | None:
    """The offer the client prefers, by ``header``'s q-values; ties go to the earlier
    offer. No header: the first offer. None if every offer is refused (q=0).

    Each offer takes the q of the most specific range that matches it
    (``type/subtype`` over ``type/*`` over ``*/*``), so ``text/*;q=0.2,
    text/html`` gives ``text/html`` q=1.
    """
    if header is None or not header.strip():
        return offers[0]
    ranges = _ranges(header)
    if not ranges:
        return offers[0]
    best: str | None = None
    best_q = 0.0
    for offer in offers:
        kind, _, sub = offer.partition("/")
        q = 0.0
        specificity = -1
        for rkind, rsub, rq in ranges:
            if rkind == kind and rsub == sub:
                rank = 2
            elif rkind == kind and rsub == "*":
                rank = 1
            elif rkind == "*":
                rank = 0
            else:
                continue
            if rank > specificity:
                specificity, q = rank, rq
        if q > best_q:
            best, best_q = offer, q
    return best
