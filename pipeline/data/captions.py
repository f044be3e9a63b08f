"""Caption cleaning and caption filters."""

from __future__ import annotations

import re
import unicodedata

from pipeline.data.drops import Drop
from pipeline.spec.prep import FilterSpec


def clean_caption(text: str) -> str:
    """Unicode NFC, and every run of whitespace (newlines, tabs) collapsed to one space."""
    return " ".join(unicodedata.normalize("NFC", text).split())


class CaptionFilter:
    """Applies the spec's caption rules to clean captions."""

    def __init__(self, spec: FilterSpec):
        self.spec = spec
        self.blocklist = (
            re.compile("|".join(f"(?:{p})" for p in spec.blocklist), re.IGNORECASE)
            if spec.blocklist
            else None
        )

    def check(self, caption: str) -> Drop | None:
        """The reason to drop this clean caption, or None to keep it."""
        spec = self.spec
        if len(caption) < spec.min_caption_chars:
            return Drop.CAPTION_TOO_SHORT
        if len(caption) > spec.max_caption_chars:
            return Drop.CAPTION_TOO_LONG
        words = len(caption.split())
        if words < spec.min_caption_words:
            return Drop.CAPTION_TOO_FEW_WORDS
        if words > spec.max_caption_words:
            return Drop.CAPTION_TOO_MANY_WORDS
        if self.blocklist is not None and self.blocklist.search(caption):
            return Drop.CAPTION_BLOCKLISTED
        return None
