"""Decoder LLMs against transformers (the oracle): logits of tiny random models of every
architecture, KV-cache decoding, dtypes, shards, old-style configs and the layer API.

Logits error: ``max|ours - theirs| / max|theirs|`` (max absolute difference relative to the
largest reference logit), bound 1e-4 in float32.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from _decoder_models import VARIANTS, build, max_rel_diff, reference_logits, rewrite_config

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import qlinear  # noqa: E402
from qlinear import QuantizedLinear, calibrate_linear  # noqa: E402
from qlinear.models import DecoderLayer, FloatLinear, load_causal_lm  # noqa: E402
from qlinear.models.decoder_ops import Int8ActivationLinear  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    return {name: build(mt, extra, root / name) for name, (mt, extra) in VARIANTS.items()}


def _ids(seed: int, batch: int = 2, seq: int = 13) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, size=(batch, seq))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(model_dirs, name):
    ids = _ids(1)
    ref = reference_logits(model_dirs[name], ids)
    model = load_causal_lm(model_dirs[name])
    out = model(ids)
    assert out.dtype == np.float32 and out.shape == (2, 13, 128)
    assert max_rel_diff(out, ref) <= TOL
    one = model(ids[1])  # 1-D ids: (seq, vocab)
    assert one.shape == (13, 128)
    assert max_rel_diff(one, ref[1]) <= TOL


@pytest.mark.parametrize(
    "name", ["llama", "mistral_window", "qwen2_window", "qwen3", "qwen2_moe", "olmoe_clip"]
)
def test_kv_cache_equals_full_sequence(model_dirs, name):
    model = load_causal_lm(model_dirs[name])
    ids = _ids(2, seq=12)
    full = model(ids)
    cache = model.new_cache(batch=2, capacity=3)  # small: the cache must grow
    parts = [model.forward(ids[:, :4], cache=cache)]
    parts += [model.forward(ids[:, i : i + 1], cache=cache) for i in range(4, 9)]
    parts.append(model.forward(ids[:, 9:], cache=cache))
    assert cache.length == 12
    assert max_rel_diff(np.concatenate(parts, axis=1), full) <= 1e-5
    last = model.forward(ids[:, :5], cache=model.new_cache(batch=2), last_only=True)
    assert last.shape == (2, 1, 128)
    assert max_rel_diff(last[:, 0], full[:, 4]) <= 1e-5


def test_old_style_rope_config_reads_the_same(model_dirs, tmp_path):
    src = model_dirs["llama_rope_llama3"]
    ref = reference_logits(src, _ids(3))
    old = tmp_path / "old"
    shutil.copytree(src, old)
    rewrite_config(
        old,
        rope_parameters=None,
        rope_theta=500000.0,
        rope_scaling={
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )
    model = load_causal_lm(old)
    assert model.config.rope == load_causal_lm(src).config.rope
    assert model.config.rope.rope_type == "llama3"
    assert max_rel_diff(model(_ids(3)), ref) <= TOL


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_and_sharded_checkpoints(tmp_path, dtype):
    d = build("qwen2", {}, tmp_path / dtype, dtype=getattr(torch, dtype), max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").is_file()
    ref = reference_logits(d, _ids(4))  # transformers widens the same half weights
    model = load_causal_lm(d)
    assert max_rel_diff(model(_ids(4)), ref) <= TOL


def test_float32_weights_are_views_of_the_file(model_dirs):
    model = load_causal_lm(model_dirs["llama"])
    down = model.linear("model.layers.0.mlp.down_proj")
    assert isinstance(down, FloatLinear)
    assert not down.weight.flags.owndata and not down.weight.flags.writeable
    # q/k/v are row views of the one fused matrix, not second copies
    q = model.linear("model.layers.0.self_attn.q_proj").weight
    k = model.linear("model.layers.0.self_attn.k_proj").weight
    assert q.base is not None and q.base is k.base


def test_linear_names_and_groups(model_dirs):
    dense = load_causal_lm(model_dirs["llama"])
    tied = load_causal_lm(model_dirs["llama_tied"])
    moe = load_causal_lm(model_dirs["qwen2_moe"])
    assert dense.linear_names()[-1] == "lm_head" and "lm_head" not in tied.linear_names()
    assert len(dense.linear_names()) == 2 * 7 + 1
    p = "model.layers.0."
    assert dense.layers[0].linear_groups() == [
        [p + "self_attn.q_proj", p + "self_attn.k_proj", p + "self_attn.v_proj"],
        [p + "self_attn.o_proj"],
        [p + "mlp.gate_proj", p + "mlp.up_proj"],
        [p + "mlp.down_proj"],
    ]
    groups = moe.layers[0].linear_groups()
    assert len(groups[2]) == 2 * 5 and len(groups[3]) == 5  # 4 experts + the shared one
    assert (
        p + "mlp.experts.3.up_proj" in groups[2] and p + "mlp.shared_expert.down_proj" in groups[3]
    )
    assert groups[3][0] == p + "mlp.experts.0.down_proj"
    # mlp_only_layers=[1]: layer 1 is a dense MLP
    assert moe.layers[1].linear_groups()[3] == ["model.layers.1.mlp.down_proj"]
    w = moe.linear_weight(p + "mlp.experts.2.gate_proj")
    assert w.shape == (32, 64) and w.dtype == np.float32


@pytest.mark.parametrize("name", ["llama", "qwen3_moe", "qwen2_moe"])
def test_layer_api_composes_to_the_model(model_dirs, name):
    model = load_causal_lm(model_dirs[name])
    ids = _ids(5)
    h = model.embed(ids)
    seen: list[tuple[str, tuple[int, ...]]] = []
    for layer in model.layers:
        names = layer.linear_names()
        calls: list[str] = []

        def capture(n, x, calls=calls):
            assert x.dtype == np.float32 and x.ndim == 2
            calls.append(n)
            seen.append((n, x.shape))

        h = layer.forward(h, capture=capture)
        assert sorted(calls) == sorted(names)  # every linear offered exactly once
    assert max_rel_diff(model.head(h), model(ids)) <= 1e-5  # MoE: another summation order
    if model.config.is_moe:  # experts see only their tokens; together top_k per token
        rows = sum(
            s[0]
            for n, s in seen
            if n.startswith("model.layers.0.mlp.experts.") and n.endswith("gate_proj")
        )
        assert rows == 2 * 13 * model.config.top_k


def test_capture_replacement_and_with_linears(model_dirs):
    model = load_causal_lm(model_dirs["mixtral"])
    ids = _ids(6)
    base = model(ids)
    name = "model.layers.0.block_sparse_moe.experts.1.w2"
    w = model.linear_weight(name)
    q = QuantizedLinear.from_fp(
        w, calibrate_linear(w, "int4", "per_group", "symmetric", group_size=16)
    )
    swapped = model.with_linears({name: q})
    assert isinstance(swapped.linear(name), QuantizedLinear)
    assert isinstance(model.linear(name), FloatLinear)  # the original is unchanged
    assert np.array_equal(model(ids), base)
    # returning q from capture gives what with_linears gives
    h = model.embed(ids)
    layer0 = model.layers[0].forward(h, capture=lambda n, x: q if n == name else None)
    assert max_rel_diff(layer0, swapped.layers[0].forward(h)) <= 1e-6
    assert max_rel_diff(swapped(ids), base) > 0  # the swap took effect
    items = qlinear.load(model_dirs["mixtral"])  # HF name -> array
    rebuilt = DecoderLayer.from_tensors(
        model.config, 0, lambda n: q if n == name + ".weight" else items[n]
    )
    assert max_rel_diff(rebuilt.forward(h), layer0) <= 1e-6


@pytest.mark.parametrize("name", ["mistral_window", "qwen2_window"])
def test_sliding_window_changes_only_far_positions(model_dirs, tmp_path, name):
    """The window variants really slide: without the window (same weights) the first
    ``window`` positions agree and later ones differ."""
    windowed = load_causal_lm(model_dirs[name])
    assert windowed.config.sliding_window == 5
    full_dir = tmp_path / "full"
    shutil.copytree(model_dirs[name], full_dir)
    rewrite_config(full_dir, sliding_window=None, use_sliding_window=False, layer_types=None)
    full = load_causal_lm(full_dir)
    assert full.config.sliding_window is None
    ids = _ids(8)
    a, b = windowed(ids), full(ids)
    assert np.array_equal(a[:, :5], b[:, :5])
    assert max_rel_diff(a[:, 5:], b[:, 5:]) > 1e-3


def test_with_linears_shares_what_it_does_not_replace(model_dirs):
    model = load_causal_lm(model_dirs["llama"])
    down = "model.layers.1.mlp.down_proj"
    w = model.linear_weight(down)
    q = QuantizedLinear.from_fp(w, calibrate_linear(w, "int8"))
    swapped = model.with_linears({down: q})
    assert swapped.layers[0] is model.layers[0]  # untouched layer: the same object
    qn = "model.layers.1.self_attn.q_proj"
    assert swapped.linear(qn).weight is model.linear(qn).weight  # fused q/k/v kept
    ids = _ids(9)
    expect = model.layers[1].forward(
        model.layers[0].forward(model.embed(ids)), capture=lambda n, x: q if n == down else None
    )
    assert max_rel_diff(swapped.head(expect), swapped(ids)) <= 1e-5


def test_attention_in_query_blocks_equals_one_block(model_dirs, monkeypatch):
    from qlinear.models import decoder_layer

    model = load_causal_lm(model_dirs["mistral_window"])
    ids = _ids(10)
    whole = model(ids)
    monkeypatch.setattr(decoder_layer, "_SCORE_ELEMENTS", 4 * 13 * 3)  # 3 query rows
    assert max_rel_diff(model(ids), whole) <= 1e-6  # per sequence, in blocks of 3 rows
    monkeypatch.setattr(decoder_layer, "_SCORE_ELEMENTS", 4 * 13 * 13)
    assert max_rel_diff(model(ids), whole) <= 1e-6  # per sequence, one block


def test_runner_linear_calls_equal_the_public_forward():
    """run_linear (the model's unchecked path) gives what each layer kind's checked
    forward gives: float, quantized, and OffsetLinear (the GGUF Q4_1 layer) with bias."""
    from qlinear.models.decoder_ops import run_linear
    from qlinear.offset_linear import OffsetLinear

    rng = np.random.default_rng(11)
    w = rng.standard_normal((40, 96)).astype(np.float32)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    p = calibrate_linear(w, "int4", "per_group", "symmetric", group_size=32)
    q = QuantizedLinear.from_fp(w, p)
    off = OffsetLinear(q.with_bias(rng.standard_normal(40)), rng.standard_normal((40, 3)))
    for lin in (FloatLinear(w, rng.standard_normal(40)), q, off):
        got = run_linear(lin, x)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, np.asarray(lin.forward(x), dtype=np.float32))
    got = run_linear(Int8ActivationLinear(q), x)
    np.testing.assert_array_equal(got, q.forward(x, activations="int8"))


def test_fused_int8_activation_parts_give_each_parts_rows():
    """q/k/v (and gate/up) of a W8A8 model fuse into one int8-activation layer whose
    columns are, bit for bit, what each part gives on its own (x is quantized per token,
    the same for every part)."""
    from qlinear.models.decoder_ops import fuse_linears, run_linear

    rng = np.random.default_rng(12)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    parts = []
    for out_f in (48, 16, 16):
        w = rng.standard_normal((out_f, 64))
        p = calibrate_linear(w, "int8", "per_channel", "symmetric")
        parts.append(QuantizedLinear.from_fp(w, p, bias=rng.standard_normal(out_f)))
    fused = fuse_linears([Int8ActivationLinear(q) for q in parts])
    assert isinstance(fused, Int8ActivationLinear)
    got = run_linear(fused, x)
    want = np.concatenate([q.forward(x, activations="int8") for q in parts], axis=1)
    np.testing.assert_array_equal(got, want)
    # a mix of int8 and float activation modes does not fuse into one mode
    assert not isinstance(fuse_linears([Int8ActivationLinear(parts[0]), parts[1]]),
                          Int8ActivationLinear)  # fmt: skip


def test_prefetching_the_next_linear_changes_no_logit(model_dirs, monkeypatch):
    """The runner asks the kernels' pool to prefetch each next linear's weight; int4 and
    int8 models give the same logits with and without (the requests only warm caches)."""
    from qlinear.kernels import native

    fp = load_causal_lm(model_dirs["llama"])
    ids = _ids(13, batch=1, seq=7)
    for qtype, gs in (("int4", 32), ("int8", None)):
        mapping = {}
        for n in fp.linear_names():
            w = fp.linear(n).weight
            p = calibrate_linear(w, qtype, "per_group" if gs else "per_channel", "symmetric",
                                 group_size=gs)  # fmt: skip
            mapping[n] = Int8ActivationLinear(QuantizedLinear.from_fp(w, p))
        q = fp.with_linears(mapping)
        requests: list[int] = []

        def recording(arrays, requests=requests, real=native.prefetch):
            requests.append(len(arrays))
            real(arrays)

        with monkeypatch.context() as m:
            m.setattr(native, "prefetch", recording)
            with_pf = [q(ids), q(ids[:, :1])]
        if native.STATUS == "ok" and qlinear.backend_info()["backend"] != "numpy":
            assert requests and max(requests) > 0  # the runner did ask, with arrays
        with monkeypatch.context() as m:
            m.setattr(native, "prefetch", lambda arrays: None)
            without = [q(ids), q(ids[:, :1])]
        for a, b in zip(with_pf, without, strict=True):
            np.testing.assert_array_equal(a, b)


def test_one_token_steps_equal_the_full_sequence_with_a_window(model_dirs):
    """Decoding one token at a time (the one-query attention path, taken when every
    cached key is visible, and the masked path once the sliding window is shorter than
    the context) gives the full sequence's logits."""
    model = load_causal_lm(model_dirs["mistral_window"])
    ids = _ids(12, batch=1, seq=16)
    full = model(ids)
    cache = model.new_cache(batch=1, capacity=2)
    steps = [model.forward(ids[:, i : i + 1], cache=cache) for i in range(16)]
    assert cache.capacity >= 16
    assert max_rel_diff(np.concatenate(steps, axis=1), full) <= 1e-5


@pytest.mark.skipif(qlinear.kernels.native.STATUS != "ok", reason="native extension not built")
def test_native_rms_norm_matches_the_numpy_specification():
    """The native RMSNorm (one call per norm in the runner) against rms_norm_numpy on
    fresh rows of awkward widths and magnitudes: float32 products in the same order, so
    within a few float32 ulps; the dispatcher falls back to NumPy for what it does not
    take (float64, strided x)."""
    from qlinear.kernels.native import rms_norm as native_rms_norm
    from qlinear.models.decoder_ops import rms_norm, rms_norm_numpy

    rng = np.random.default_rng(14)
    for n in (1, 3, 17):
        for d in (1, 5, 63, 64, 65, 576, 1537):
            for mag in (1e-3, 1.0, 1e4):
                x = (rng.standard_normal((n, d)) * mag).astype(np.float32)
                w = rng.standard_normal(d).astype(np.float32)
                eps = float(rng.choice([1e-6, 1e-5]))
                want = rms_norm_numpy(x, w, eps)
                got = native_rms_norm(x, w, eps)
                assert got.dtype == np.float32 and got.shape == (n, d)
                bound = 4 * np.finfo(np.float32).eps * (np.abs(want) + np.finfo(np.float32).tiny)
                assert (np.abs(got - want) <= bound).all(), (n, d, mag)
    x3 = rng.standard_normal((2, 3, 40)).astype(np.float32)
    w = rng.standard_normal(40).astype(np.float32)
    np.testing.assert_allclose(rms_norm(x3, w, 1e-5), rms_norm_numpy(x3, w, 1e-5), rtol=1e-6)
    strided = x3[:, :, ::2]  # not C-contiguous: the NumPy path, bit for bit
    w20 = w[:20].copy()
    np.testing.assert_array_equal(rms_norm(strided, w20, 1e-5), rms_norm_numpy(strided, w20, 1e-5))
    x64 = x3.astype(np.float64)
    np.testing.assert_array_equal(rms_norm(x64, w, 1e-5), rms_norm_numpy(x64, w, 1e-5))
