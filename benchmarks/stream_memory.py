"""Does a streaming rewrite's peak memory stay flat as the model grows?

Builds synthetic checkpoints with identical layer shapes and different numbers
of layers, then runs :func:`surgery.checkpoint.stream_rewrite` on each in a
fresh subprocess with an edit that changes every other tensor (computed in
float32, cast back).  The child reports its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) and its RSS high-water mark just
before the rewrite (after imports), so the rewrite's own cost is visible.

If the I/O streams, the peaks are ~equal while the checkpoint sizes differ by
the layer ratio.  Usage::

    python benchmarks/stream_memory.py                    # 8 vs 32 layers of 1024x1024 f32
    python benchmarks/stream_memory.py --layers 4 16 --dim 512 --tensors-per-layer 4

``tests/test_checkpoint.py`` runs a small version through :func:`run_benchmark`.
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
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

_CHILD = r"""
import json, resource, sys
import torch
from surgery.checkpoint import CheckpointReader, CheckpointWriter, stream_rewrite

src, dst = sys.argv[1], sys.argv[2]
def rss_kb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

with CheckpointReader(src) as r:
    edit_names = set(r.names[::2])
    def edit(name, t):
        if name not in edit_names:
            return None
        return t.float() * 0.5 + 1.0
    before = rss_kb()
    with CheckpointWriter(dst, max_shard_bytes=10**12) as w:
        edited = stream_rewrite(r, w, edit)
    peak = rss_kb()
print(json.dumps({"before_kb": before, "peak_kb": peak, "edited": len(edited), "tensors": len(r.names)}))
"""


def make_checkpoint(folder: Path, layers: int, dim: int, tensors_per_layer: int = 1, dtype: str = "float32") -> int:
    """Write a one-shard synthetic checkpoint (streamed, so the parent stays small). Returns its tensor bytes."""
    import torch

    from surgery.checkpoint import CheckpointWriter

    dt = getattr(torch, dtype)
    names = [f"model.layers.{i}.w{j}.weight" for i in range(layers) for j in range(tensors_per_layer)]
    with CheckpointWriter(folder, max_shard_bytes=10**12) as w:
        w.plan([(n, dt, (dim, dim)) for n in names])
        g = torch.Generator().manual_seed(0)
        for n in names:
            w.write(n, torch.randn(dim, dim, generator=g).to(dt))
        (w.tmp_dir / "config.json").write_text(json.dumps({"model_type": "synthetic", "num_hidden_layers": layers}))
    return len(names) * dim * dim * dt.itemsize


def measure(src: Path, dst: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(src), str(dst)], capture_output=True, text=True, env=env, cwd=str(REPO)
    )
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_benchmark(layer_counts=(8, 32), dim: int = 1024, tensors_per_layer: int = 1, workdir=None) -> list[dict]:
    """One result dict per layer count: layers, checkpoint_bytes, peak_bytes, before_bytes."""
    results = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for layers in layer_counts:
            src, dst = Path(tmp) / f"src-{layers}", Path(tmp) / f"dst-{layers}"
            size = make_checkpoint(src, layers, dim, tensors_per_layer)
            m = measure(src, dst)
            results.append(
                {
                    "layers": layers,
                    "checkpoint_bytes": size,
                    "peak_bytes": m["peak_kb"] * 1024,
                    "before_bytes": m["before_kb"] * 1024,
                    "edited": m["edited"],
                    "tensors": m["tensors"],
                }
            )
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs=2, default=[8, 32])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--tensors-per-layer", type=int, default=1)
    args = ap.parse_args(argv)
    res = run_benchmark(args.layers, args.dim, args.tensors_per_layer)
    mb = 1 / 2**20
    for r in res:
        print(
            f"layers={r['layers']:4d}  checkpoint={r['checkpoint_bytes'] * mb:8.1f} MiB  "
            f"peak RSS={r['peak_bytes'] * mb:8.1f} MiB  (before rewrite {r['before_bytes'] * mb:7.1f} MiB, "
            f"rewrite adds {(r['peak_bytes'] - r['before_bytes']) * mb:6.1f} MiB)  edited {r['edited']}/{r['tensors']}"
        )
    a, b = res
    print(
        f"checkpoint size ratio {b['checkpoint_bytes'] / a['checkpoint_bytes']:.2f}x, "
        f"peak RSS ratio {b['peak_bytes'] / a['peak_bytes']:.3f}x, "
        f"peak growth {(b['peak_bytes'] - a['peak_bytes']) * mb:.1f} MiB for "
        f"{(b['checkpoint_bytes'] - a['checkpoint_bytes']) * mb:.1f} MiB more checkpoint"
    )


if __name__ == "__main__":
    main()
