"""Ray executor against the serial path on this machine, and the per-unit costs that
docs/scale.md extrapolates from.

Parts (``--parts``, default all):

* ``rtn``: a generated sharded checkpoint (``--layers`` llama-like layers of hidden
  ``--hidden``), quantized int8 per channel by the serial path, by Ray with one task at a
  time (``cpus_per_task=2``: "1 worker") and by Ray with two at a time ("2 workers"),
  interleaved for ``--rounds`` rounds with pauses; prints the median wall time of each, the
  ratio to serial, the mean task time inside the workers and Ray's per-task overhead
  (``(wall * parallel - sum of task seconds) / tasks``). Cluster start-up is timed once.
* ``gptq``: layer-sequential GPTQ (int4 g128) of a float checkpoint (``--gptq-model``,
  default the SmolLM2-135M fixture ``QLINEAR_SMOLLM2_DIR`` or /work/fixtures/smollm2-f32)
  serially and on Ray with 1 and 2 worker actors; wall time, seconds per layer and the
  perplexity of each result (within 0.5% of serial is the target).
* ``units``: float32 Hessian accumulation GFLOP/s (``2 T d^2`` flops), one GPTQ solve of a
  DeepSeek-V3 routed expert's gate/up (2048 x 7168) and down (7168 x 2048) weight.

Every cluster is local, bound to 127.0.0.1, 2 CPUs, and stopped at the end. Run::

    PYTHONPATH=src python benchmarks/bench_ray.py [--parts rtn gptq units] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on 127.0.0.1 only

import numpy as np

from qlinear import quantize_checkpoint


def make_checkpoint(out: Path, layers: int, hidden: int, rng: np.random.Generator) -> int:
    import safetensors.numpy as stnp

    out.mkdir(parents=True)
    inter = 3 * hidden
    wm, total = {}, 0
    r = lambda *s: rng.standard_normal(s, dtype=np.float32)  # noqa: E731
    for i in range(layers):
        p = f"model.layers.{i}"
        t = {
            f"{p}.input_layernorm.weight": r(hidden),
            **{f"{p}.self_attn.{k}_proj.weight": r(hidden, hidden) for k in "qkvo"},
            f"{p}.mlp.gate_proj.weight": r(inter, hidden),
            f"{p}.mlp.up_proj.weight": r(inter, hidden),
            f"{p}.mlp.down_proj.weight": r(hidden, inter),
        }
        name = f"model-{i:05d}.safetensors"
        stnp.save_file(t, str(out / name))
        wm.update(dict.fromkeys(t, name))
        total += sum(a.nbytes for a in t.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": wm})
    )
    return total


def bench_rtn(ray, args, tmp: Path) -> None:
    from qlinear.distributed.ray_executor import RayExecutor

    src = tmp / "src"
    nbytes = make_checkpoint(src, args.layers, args.hidden, np.random.default_rng(0))
    cfg = {"qtype": "int8", "granularity": "per_channel"}
    runs = {
        "serial": None,
        "ray, 1 worker": 2,  # cpus_per_task=2 on a 2-CPU cluster: one task at a time
        "ray, 2 workers": 1,
    }
    wall: dict[str, list[float]] = {k: [] for k in runs}
    tasks: dict[str, list[dict]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for name, cpus in runs.items():
            dst = tmp / "dst"
            shutil.rmtree(dst, ignore_errors=True)
            ex = None if cpus is None else RayExecutor(cpus_per_task=cpus)
            t0 = time.perf_counter()
            rep = quantize_checkpoint(src, dst, cfg, progress=False, executor=ex)
            wall[name].append(time.perf_counter() - t0)
            tasks[name] = list(rep.tasks)
            time.sleep(args.pause)
    ser = statistics.median(wall["serial"])
    print(
        f"\nround to nearest, int8 per channel: {args.layers} layers x hidden {args.hidden}, "
        f"{nbytes / 1e6:.0f} MB float32, {len(tasks['ray, 2 workers'])} tasks; median of "
        f"{args.rounds}"
    )
    print(f"{'path':16} {'wall s':>8} {'/serial':>8} {'MB/s':>7} {'task s':>8} {'ovh ms/task':>11}")
    for name, cpus in runs.items():
        w = statistics.median(wall[name])
        if cpus is None:
            extra = f"{'':>8} {'':>11}"
        else:
            ts = [t["seconds"] for t in tasks[name]]
            par = 2 // cpus
            ovh = (w * par - sum(ts)) / len(ts) * 1e3
            extra = f"{statistics.mean(ts):8.4f} {ovh:11.1f}"
        print(f"{name:16} {w:8.3f} {w / ser:8.2f} {nbytes / 1e6 / w:7.0f} {extra}")


def _ppl(path: Path) -> float:
    from qlinear.models import load_causal_lm
    from qlinear.models.perplexity import text_perplexity

    return text_perplexity(load_causal_lm(path), ctx=256, max_tokens=4096).perplexity


def bench_gptq(ray, args, tmp: Path) -> None:
    from qlinear.distributed.ray_executor import RayExecutor
    from qlinear.models.gptq_checkpoint import GPTQOptions, gptq_quantize_checkpoint

    src = Path(args.gptq_model)
    cfg = {"qtype": "int4", "granularity": "per_group", "group_size": 128}
    opts = GPTQOptions(samples=args.samples, seqlen=args.seqlen)
    rows = []
    for name, workers in (("serial", None), ("ray, 1 worker", 1), ("ray, 2 workers", 2)):
        dst = tmp / f"gptq-{workers}"
        shutil.rmtree(dst, ignore_errors=True)
        ex = None if workers is None else RayExecutor(gptq_workers=workers)
        t0 = time.perf_counter()
        rep = gptq_quantize_checkpoint(src, dst, cfg, options=opts, progress=False, executor=ex)
        w = time.perf_counter() - t0
        recs = ex.records() if ex is not None else ()
        rows.append((name, w, rep, recs, _ppl(dst)))
        time.sleep(args.pause)
    base = _ppl(src)
    ser = rows[0]
    print(
        f"\nGPTQ int4 g128 of {src.name}: {ser[2].num_layers} layers, {len(ser[2].gptq)} "
        f"linears, {args.samples} x {args.seqlen} calibration tokens; float perplexity "
        f"{base:.3f}"
    )
    print(f"{'path':16} {'wall s':>8} {'/serial':>8} {'s/layer':>8} {'ppl':>9} {'ppl/serial':>10}")
    for name, w, rep, recs, ppl in rows:
        per = statistics.median(rep.layer_seconds)
        print(f"{name:16} {w:8.2f} {w / ser[1]:8.2f} {per:8.3f} {ppl:9.4f} {ppl / ser[4]:10.5f}")
        if recs:
            kinds: dict[str, list[float]] = {}
            for r in recs:
                kinds.setdefault(r["task"].split()[0], []).append(r["seconds"])
            print(
                "    tasks: "
                + ", ".join(
                    f"{k} {len(v)} x {statistics.mean(v) * 1e3:.1f} ms" for k, v in kinds.items()
                )
            )


def bench_units(args) -> None:
    from qlinear import gptq_quantize
    from qlinear.gptq import HessianAccumulator

    rng = np.random.default_rng(1)
    d, t = 2048, 8192
    x = rng.standard_normal((t, d), dtype=np.float32)
    acc = HessianAccumulator(d)
    t0 = time.perf_counter()
    acc.add(x)
    s = time.perf_counter() - t0
    gflops = 2 * t * d * d / s / 1e9
    print(f"\nHessian accumulation, float32 {t} x {d}: {s:.3f} s, {gflops:.1f} GFLOP/s")
    for out_f, in_f in ((2048, 7168), (7168, 2048)):
        w = rng.standard_normal((out_f, in_f)) * 0.02
        xs = rng.standard_normal((2 * in_f, in_f), dtype=np.float32)
        h = HessianAccumulator(in_f)
        h.add(xs)
        hv = h.value()
        del xs
        time.sleep(args.pause)
        t0 = time.perf_counter()
        gptq_quantize(w, None, "int4", "per_group", group_size=128, hessian=hv)
        s = time.perf_counter() - t0
        print(f"GPTQ solve int4 g128 of one {out_f} x {in_f} weight (act order): {s:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", default=["rtn", "gptq", "units"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pause", type=float, default=1.0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=768)
    default_model = os.environ.get("QLINEAR_SMOLLM2_DIR", "/work/fixtures/smollm2-f32")
    ap.add_argument("--gptq-model", default=default_model)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_ray-"))
    try:
        if {"rtn", "gptq"} & set(args.parts):
            import ray

            t0 = time.perf_counter()
            ray.init(
                num_cpus=2,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                log_to_driver=False,
                configure_logging=False,
            )
            print(f"local Ray cluster (2 CPUs) start-up: {time.perf_counter() - t0:.2f} s")
            try:
                if "rtn" in args.parts:
                    bench_rtn(ray, args, tmp)
                if "gptq" in args.parts:
                    bench_gptq(ray, args, tmp)
            finally:
                ray.shutdown()
        if "units" in args.parts:
            bench_units(args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
