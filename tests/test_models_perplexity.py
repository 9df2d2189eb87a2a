"""qlinear.models.perplexity and ``qlinear perplexity``: against transformers' own
perplexity on the same tokens, windows, and bad input."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from _tiny_lm import build_tiny
from qlinear.cli import main
from qlinear.errors import InvalidInputError, InvalidParamsError
from qlinear.models.perplexity import perplexity, token_nll


def _torch_perplexity(model_dir, ids, ctx):
    """exp(mean NLL) from transformers: per window, cross-entropy of logits[:-1] vs ids[1:]."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids), ctx):
            w = torch.tensor([ids[s : s + ctx]])
            if w.shape[1] < 2:
                break
            logits = ref(w).logits[0].double()
            nll = torch.nn.functional.cross_entropy(logits[:-1], w[0, 1:], reduction="sum")
            total, n = total + float(nll), n + w.shape[1] - 1
    return math.exp(total / n), n


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    return build_tiny(tmp_path_factory.mktemp("tiny") / "llama")


def _cli_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_tiny_llama_matches_transformers(tiny_llama, capsys):
    from qlinear.models import load_causal_lm
    from qlinear.models.corpus import corpus_text

    ids = load_causal_lm(tiny_llama).tokenizer.encode(corpus_text("eval"))[:150]
    want, n = _torch_perplexity(tiny_llama, ids, 64)  # windows of 64, 64 and 22 tokens
    got = _cli_json(
        capsys, ["perplexity", str(tiny_llama), "--ctx", "64", "--max-tokens", "150", "--json"]
    )
    assert got["tokens"] == n == 147
    assert abs(got["perplexity"] / want - 1) <= 1e-3
    assert got["seconds"] >= 0


def test_smollm2_matches_transformers(smollm2_dir, capsys, tmp_path):
    pytest.importorskip("transformers")
    from qlinear.models import load_causal_lm
    from qlinear.models.corpus import corpus_text

    text = tmp_path / "t.txt"
    text.write_text(corpus_text("eval")[:4000], encoding="utf-8")
    ids = load_causal_lm(smollm2_dir).tokenizer.encode(text.read_text(encoding="utf-8"))[:200]
    want, n = _torch_perplexity(smollm2_dir, ids, 128)
    argv = ["perplexity", str(smollm2_dir), "--text", str(text), "--ctx", "128"]
    got = _cli_json(capsys, [*argv, "--max-tokens", "200", "--json"])
    assert got["tokens"] == n == 198
    assert abs(got["perplexity"] / want - 1) <= 1e-3
    assert 1 < got["perplexity"] < 100  # real English under a real model


def test_windows_are_scored_on_all_but_their_first_position():
    vocab = 7

    class Uniformish:  # logits favour token (previous + 1) % vocab
        def __call__(self, ids):
            out = np.zeros((len(ids), vocab), dtype=np.float32)
            out[np.arange(len(ids)), (np.asarray(ids) + 1) % vocab] = 3.0
            return out

    ids = np.arange(10) % vocab  # every next token is the favoured one
    r = perplexity(Uniformish(), ids, ctx=4)  # windows 4, 4, 2 -> 3 + 3 + 1 scored
    p = math.exp(3) / (math.exp(3) + vocab - 1)
    assert r.tokens == 7 and r.windows == 3
    assert r.perplexity == pytest.approx(1 / p, rel=1e-12)
    r1 = perplexity(Uniformish(), ids, ctx=9)  # windows 9 and 1: the lone token is dropped
    assert r1.tokens == 8 and r1.windows == 1


def test_token_nll_is_stable_for_huge_logits():
    lg = np.array([[1e30, 0.0, -1e30], [3e38, 3e38, 0.0]], dtype=np.float32)
    nll = token_nll(lg, np.array([0, 1]))
    assert np.all(np.isfinite(nll))
    assert nll[0] == 0.0 and nll[1] == pytest.approx(math.log(2))


def test_bad_input():
    def model(ids):
        return np.zeros((len(ids), 3), dtype=np.float32)

    with pytest.raises(InvalidInputError, match="1 token"):
        perplexity(model, [1], ctx=4)
    with pytest.raises(InvalidParamsError, match="ctx"):
        perplexity(model, [1, 2, 3], ctx=1)
    with pytest.raises(InvalidInputError, match="max_position_embeddings 8"):
        perplexity(model, [1, 2, 3], ctx=16, max_positions=8)
    with pytest.raises(InvalidInputError, match="NaN"):
        perplexity(lambda ids: np.full((len(ids), 3), np.nan, np.float32), [1, 2], ctx=4)


def test_cli_errors(tiny_llama, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    assert main(["perplexity", str(tiny_llama), "--text", str(empty)]) == 1
    assert "empty" in capsys.readouterr().err
    one = tmp_path / "one.txt"
    one.write_text("a", encoding="utf-8")
    assert main(["perplexity", str(tiny_llama), "--text", str(one), "--ctx", "32"]) == 1
    assert "at least 2" in capsys.readouterr().err
    assert main(["perplexity", str(tiny_llama), "--ctx", "65"]) == 1  # max_position 64
    assert "max_position_embeddings 64" in capsys.readouterr().err
    assert main(["perplexity", str(tiny_llama), "--ctx", "1"]) == 2


def test_cli_activations_choose_the_linear_mode(tiny_llama, tmp_path, capsys):
    """``qlinear perplexity --activations int8`` scores the model as
    ``load_causal_lm(..., activations="int8")`` runs it; "float" as stored; a mode
    argparse does not know is a usage error (exit 2)."""
    from qlinear.models import load_causal_lm
    from qlinear.models.perplexity import text_perplexity

    q = tmp_path / "w8"
    assert main(["quantize", str(tiny_llama), "-o", str(q), "--bits", "8", "--no-progress"]) == 0
    capsys.readouterr()
    base = ["perplexity", str(q), "--ctx", "32", "--max-tokens", "70", "--json"]
    runs = {a: _cli_json(capsys, [*base, "--activations", a]) for a in ("float", "int8")}
    for a, got in runs.items():
        want = text_perplexity(load_causal_lm(q, activations=a), ctx=32, max_tokens=70)
        assert got["perplexity"] == pytest.approx(want.perplexity, rel=1e-12)
        assert got["tokens"] == want.tokens == 70 - 3  # windows of 32, 32 and 6 tokens
    assert runs["int8"]["perplexity"] != runs["float"]["perplexity"]  # a different mode ran
    assert _cli_json(capsys, base)["perplexity"] == runs["float"]["perplexity"]
    assert main([*base, "--activations", "int4"]) == 2
    assert "--activations" in capsys.readouterr().err
