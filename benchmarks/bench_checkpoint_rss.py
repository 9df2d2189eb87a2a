"""Peak memory of quantize_checkpoint on a generated multi-GB sharded checkpoint.

    PYTHONPATH=src python benchmarks/bench_checkpoint_rss.py [--gb 3] [--dtype F32|BF16]
        [--bits 8] [--dir /tmp/qlinear-bench]

Generates a Llama-like sharded checkpoint (random weights, written block by block so the
generator itself stays small), then runs ``qlinear quantize`` in a child process and
reports its peak RSS (``ru_maxrss``) next to the size of the checkpoint and of its largest
tensor; as a peer, the peak RSS of a child that reads the largest shard into memory (the
least a tool that does not stream has to hold).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import qlinear
from qlinear._safetensors import SafetensorsWriter, atomic_write

# children run the same qlinear as this process (installed build or source tree)
SRC = Path(qlinear.__file__).resolve().parents[1]


def _bf16(a: np.ndarray) -> np.ndarray:
    u = a.view(np.uint32)
    return (
        (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    ).astype(np.uint16)


def generate(d: Path, gb: float, dtype: str) -> tuple[int, int]:
    """A checkpoint of ~gb GiB in shards of ~1 GiB; returns (total bytes, largest tensor)."""
    itemsize = 4 if dtype == "F32" else 2
    hidden, inter, vocab = 4096, 11008, 32000
    per_layer = [
        ("self_attn.q_proj.weight", (hidden, hidden)),
        ("self_attn.k_proj.weight", (hidden, hidden)),
        ("self_attn.v_proj.weight", (hidden, hidden)),
        ("self_attn.o_proj.weight", (hidden, hidden)),
        ("mlp.gate_proj.weight", (inter, hidden)),
        ("mlp.up_proj.weight", (inter, hidden)),
        ("mlp.down_proj.weight", (hidden, inter)),
        ("input_layernorm.weight", (hidden,)),
        ("post_attention_layernorm.weight", (hidden,)),
    ]
    tensors = [("model.embed_tokens.weight", (vocab, hidden))]
    budget = gb * 2**30
    total = vocab * hidden * itemsize * 2  # embeddings + lm_head
    i = 0
    while True:
        layer_bytes = int(sum(np.prod(s) for _, s in per_layer)) * itemsize
        if total + layer_bytes > budget and i > 0:
            break
        tensors += [(f"model.layers.{i}.{n}", s) for n, s in per_layer]
        total += layer_bytes
        i += 1
    tensors += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    shards, cur, cur_bytes = [], [], 0
    for name, shape in tensors:
        nb = int(np.prod(shape)) * itemsize
        if cur and cur_bytes + nb > 2**30:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += nb
    shards.append(cur)
    rng = np.random.default_rng(0)
    weight_map = {}
    largest = 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        w = SafetensorsWriter([(n, dtype, s) for n, s in shard], {"format": "pt"})
        with atomic_write(d / fname) as f:
            w.begin(f)
            for name, shape in shard:
                largest = max(largest, int(np.prod(shape)) * itemsize)
                rows = shape[0]
                cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
                step = max(1, (16 << 20) // (4 * cols))
                for a in range(0, rows, step):
                    b = min(rows, a + step)
                    blk = rng.standard_normal((b - a) * cols, dtype=np.float32) * 0.02
                    blk = blk if dtype == "F32" else _bf16(blk)
                    w.write(f, name, blk, at=a * cols * itemsize)
                weight_map[name] = fname
            w.finish()
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (d / "config.json").write_text('{"model_type": "llama"}')
    return sum(p.stat().st_size for p in d.glob("*.safetensors")), largest


def child_peak(cmd: list[str]) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of a child process."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    t0 = time.perf_counter()
    pid = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL).pid
    _, status, ru = os.wait4(pid, 0)
    if status != 0:
        raise SystemExit(f"child failed: {cmd} (status {status})")
    return time.perf_counter() - t0, ru.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=3.0)
    ap.add_argument("--dtype", choices=("F32", "BF16"), default="F32")
    ap.add_argument("--bits", default="8")
    ap.add_argument("--dir", default="/tmp/qlinear-bench")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    args = ap.parse_args()
    root = Path(args.dir)
    src, dst = root / "ckpt_src", root / "ckpt_dst"
    for p in (src, dst):
        shutil.rmtree(p, ignore_errors=True)
    src.mkdir(parents=True)
    t0 = time.perf_counter()
    total, largest = generate(src, args.gb, args.dtype)
    shards = sorted(src.glob("*.safetensors"))
    print(
        f"checkpoint: {len(shards)} shards, {total / 2**30:.2f} GiB {args.dtype}, largest "
        f"tensor {largest / 2**20:.0f} MiB (generated in {time.perf_counter() - t0:.0f} s)"
    )
    base_t, base_rss = child_peak([sys.executable, "-c", "import qlinear, numpy"])
    q_t, q_rss = child_peak(
        [
            sys.executable,
            "-m",
            "qlinear",
            "quantize",
            str(src),
            "-o",
            str(dst),
            "--bits",
            args.bits,
            "--no-progress",
        ]
    )
    biggest = max(shards, key=lambda p: p.stat().st_size)
    peer_t, peer_rss = child_peak(
        [
            sys.executable,
            "-c",
            "import sys, pathlib; pathlib.Path(sys.argv[1]).read_bytes()",
            str(biggest),
        ]
    )
    mib = 2**20
    print(f"{'process':<44}{'time':>9}{'peak RSS':>12}")
    print(f"{'python -c import qlinear (baseline)':<44}{base_t:>8.1f}s{base_rss / mib:>9.0f}MiB")
    print(
        f"{'qlinear quantize (all shards, int' + args.bits + ')':<44}{q_t:>8.1f}s"
        f"{q_rss / mib:>9.0f}MiB"
    )
    print(f"{'read_bytes of the largest shard (peer)':<44}{peer_t:>8.1f}s{peer_rss / mib:>9.0f}MiB")
    print(
        f"peak RSS / checkpoint size: {q_rss / total:.3f}; / largest tensor: "
        f"{q_rss / largest:.2f}; / peer: {q_rss / peer_rss:.2f}"
    )
    out = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    print(f"output: {out / 2**30:.2f} GiB ({total / out:.2f}x smaller)")
    if not args.keep:
        shutil.rmtree(src)
        shutil.rmtree(dst)


if __name__ == "__main__":
    main()
