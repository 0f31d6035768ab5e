"""Does merging a LoRA adapter keep peak memory flat as the number of layers grows?

Synthetic llama checkpoints (``benchmarks/rosi_memory.make_llama``: real tensor
names, random weights) of the same width with 8 vs 32 layers each get a LoRA
adapter on every q/k/v/o/gate/up/down projection (written with
``surgery.adapters.save_peft_adapter``), and are merged with
``surgery.adapters.merge_adapter`` in a fresh subprocess each; the child reports
its peak RSS.  The adapter's A and B are held in memory (float32) during the
merge, so the expected growth is the adapter's size, not the checkpoint's.

    python benchmarks/merge_memory.py                 # 8 vs 32 layers, width 1024, rank 16
    python benchmarks/merge_memory.py --layers 4 16 --dim 256 --rank 8
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO), str(REPO / "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

from rosi_memory import make_llama  # noqa: E402 - the same synthetic checkpoints as the ROSI benchmark

_CHILD = r"""
import json, resource, sys
from surgery.adapters import load_adapter, merge_adapter
from surgery.checkpoint import CheckpointReader
src, ad, dst = sys.argv[1], sys.argv[2], sys.argv[3]
with CheckpointReader(src) as r:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    adapter = load_adapter(ad)
    edited = merge_adapter(r, adapter, dst, max_shard_bytes=256 * 2**20, say=lambda m: None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kb": before, "peak_kb": peak, "edited": len(edited)}))
"""

MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def make_adapter(folder: Path, layers: int, dim: int, rank: int) -> int:
    """A random LoRA adapter for ``rosi_memory.make_llama``'s model; returns its A+B bytes."""
    import torch

    from surgery.adapters import save_peft_adapter

    ffn = 2 * dim
    g = torch.Generator().manual_seed(1)
    mods, nbytes = {}, 0
    for i in range(layers):
        for m in MODULES:
            d_in = ffn if m == "mlp.down_proj" else dim
            d_out = ffn if m in ("mlp.gate_proj", "mlp.up_proj") else dim
            A, B = torch.randn(rank, d_in, generator=g) * 0.01, torch.randn(d_out, rank, generator=g) * 0.01
            mods[f"model.layers.{i}.{m}"] = (A, B)
            nbytes += 4 * (A.numel() + B.numel())
    save_peft_adapter(folder, mods, r=rank, alpha=2 * rank)
    return nbytes


def measure(src: Path, adapter: Path, dst: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(adapter), str(dst)], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_benchmark(layer_counts=(8, 32), dim: int = 1024, rank: int = 16) -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in layer_counts:
            src, ad, dst = Path(tmp) / f"src{n}", Path(tmp) / f"ad{n}", Path(tmp) / f"dst{n}"
            size = make_llama(src, n, dim)
            ad_bytes = make_adapter(ad, n, dim, rank)
            m = measure(src, ad, dst)
            out.append({"layers": n, "checkpoint_bytes": size, "adapter_bytes": ad_bytes,
                        "peak_bytes": m["peak_kb"] * 1024, "before_bytes": m["before_kb"] * 1024, "edited": m["edited"]})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs=2, default=[8, 32])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args(argv)
    res = run_benchmark(args.layers, args.dim, args.rank)
    mb = 1 / 2**20
    for r in res:
        print(f"layers={r['layers']:3d}  checkpoint={r['checkpoint_bytes'] * mb:8.1f} MiB  adapter={r['adapter_bytes'] * mb:6.1f} MiB"
              f"  peak RSS={r['peak_bytes'] * mb:7.1f} MiB  (merge adds {(r['peak_bytes'] - r['before_bytes']) * mb:6.1f} MiB)"
              f"  edited {r['edited']}")
    a, b = res
    print(f"checkpoint size ratio {b['checkpoint_bytes'] / a['checkpoint_bytes']:.2f}x, "
          f"peak RSS ratio {b['peak_bytes'] / a['peak_bytes']:.3f}x, "
          f"peak growth {(b['peak_bytes'] - a['peak_bytes']) * mb:.1f} MiB vs adapter growth "
          f"{(b['adapter_bytes'] - a['adapter_bytes']) * mb:.1f} MiB")


if __name__ == "__main__":
    main()
