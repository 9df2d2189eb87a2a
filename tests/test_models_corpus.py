"""qlinear.models.corpus: the stdlib-docs text split into evaluation and calibration."""

from pydoc_data.topics import topics

import pytest

from qlinear.errors import InvalidParamsError
from qlinear.models.corpus import corpus_text, corpus_topics


def test_parts_are_disjoint_non_empty_and_cover_every_topic():
    ev, ca = corpus_topics("eval"), corpus_topics("calib")
    assert ev and ca
    assert not set(ev) & set(ca)
    assert set(ev) | set(ca) == set(topics)
    assert len(ca) > 2 * len(ev)  # calibration needs the larger part (128 x 512 tokens)


def test_texts_hold_their_topics_only_and_are_deterministic():
    ev, ca = corpus_text("eval"), corpus_text("calib")
    assert ev == corpus_text("eval") and len(ev) > 50_000 and len(ca) > 200_000
    for name in corpus_topics("eval")[:5]:
        assert topics[name].strip() in ev
    for name in corpus_topics("calib")[:5]:
        assert topics[name].strip() in ca and topics[name].strip() not in ev


def test_unknown_part():
    with pytest.raises(InvalidParamsError, match="part"):
        corpus_topics("train")
