"""The English sentences shipped with qlinear (``qlinear/data/sentences.txt``).

The file has two sections, ``# calib`` (60 sentences, for calibration such as GPTQ's
Hessian) and ``# heldout`` (20 sentences, for measuring error on data calibration did not
see); one sentence per line, blank lines ignored.
"""

from __future__ import annotations

from importlib import resources

from ..errors import InvalidParamsError

__all__ = ["sentences"]

SPLITS = ("calib", "heldout", "all")


def _sections() -> dict[str, list[str]]:
    text = resources.files("qlinear").joinpath("data/sentences.txt").read_text(encoding="utf-8")
    out: dict[str, list[str]] = {"calib": [], "heldout": []}
    current: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            current = out.get(line[1:].strip())
            continue
        if current is not None:
            current.append(line)
    return out


def sentences(split: str = "all") -> list[str]:
    """The shipped sentences: ``"calib"`` (60), ``"heldout"`` (20) or ``"all"`` (calib
    then heldout, 80)."""
    if split not in SPLITS:
        raise InvalidParamsError(f"split must be one of {SPLITS}; got {split!r}")
    s = _sections()
    if split == "all":
        return s["calib"] + s["heldout"]
    return list(s[split])
