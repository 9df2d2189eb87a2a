"""The default text of ``qlinear perplexity`` and of GPTQ calibration: Python's own
documentation, shipped with every CPython as ``pydoc_data.topics.topics`` (a dict of
help topic -> text; real English prose mixed with code).

The topics are sorted by name and split by position: every :data:`EVAL_EVERY`-th topic
(positions 0, 4, 8, ...) is evaluation text, the others calibration text. The two parts
share no topic, and the split depends only on the topic names, not on hashing or the
Python process. On CPython 3.11 that is about 123 kB of evaluation text (~30k SmolLM2
tokens) and 342 kB of calibration text (~83k tokens): room for 128 x 512 calibration
tokens.
"""

from __future__ import annotations

from typing import Literal

from ..errors import InvalidParamsError

__all__ = ["EVAL_EVERY", "corpus_text", "corpus_topics"]

EVAL_EVERY = 4
_SEP = "\n\n"

Part = Literal["eval", "calib"]


def corpus_topics(part: Part) -> list[str]:
    """The sorted topic names of ``part`` (``"eval"`` or ``"calib"``)."""
    from pydoc_data.topics import topics

    if part not in ("eval", "calib"):
        raise InvalidParamsError(f"part must be 'eval' or 'calib'; got {part!r}")
    names = sorted(topics)
    want_eval = part == "eval"
    return [n for i, n in enumerate(names) if (i % EVAL_EVERY == 0) == want_eval]


def corpus_text(part: Part) -> str:
    """The text of ``part``: its topics' texts in sorted-name order, joined by a blank line."""
    from pydoc_data.topics import topics

    return _SEP.join(topics[n].strip() for n in corpus_topics(part))
