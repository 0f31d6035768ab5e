"""Does ROSI's peak memory stay flat as the number of layers grows?

Synthetic llama checkpoints (real tensor names, so the architecture data places
them; random weights) with the same width and 8 vs 32 layers are hardened with
``surgery.pipeline.write_rosi`` in a fresh subprocess each; the child reports its
peak RSS.  Printed as a ratio against the smaller model measured in the same run.

    python benchmarks/rosi_memory.py                 # 8 vs 32 layers, width 1024
    python benchmarks/rosi_memory.py --layers 4 16 --dim 256
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
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_CHILD = r"""
import json, resource, sys, torch
from surgery.architectures import get_architecture
from surgery.checkpoint import CheckpointReader
from surgery.pipeline import write_rosi
src, dst = sys.argv[1], sys.argv[2]
with CheckpointReader(src) as r:
    arch = get_architecture(r.config)
    d = arch.hidden_size(r.config)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(d, generator=g)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    edited = write_rosi(r, arch, dst, v / v.norm(), 10.0, None, False, False, max_shard_bytes=256 * 2**20)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kb": before, "peak_kb": peak, "edited": len(edited)}))
"""


def make_llama(folder: Path, layers: int, dim: int, vocab: int = 1024) -> int:
    import torch

    from surgery.checkpoint import CheckpointWriter

    ffn = 2 * dim
    shapes = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (dim,), p + "post_attention_layernorm.weight": (dim,),
                       p + "self_attn.q_proj.weight": (dim, dim), p + "self_attn.k_proj.weight": (dim, dim),
                       p + "self_attn.v_proj.weight": (dim, dim), p + "self_attn.o_proj.weight": (dim, dim),
                       p + "mlp.gate_proj.weight": (ffn, dim), p + "mlp.up_proj.weight": (ffn, dim),
                       p + "mlp.down_proj.weight": (dim, ffn)})
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": dim, "intermediate_size": ffn,
           "num_hidden_layers": layers, "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": vocab,
           "tie_word_embeddings": True}
    g = torch.Generator().manual_seed(0)
    with CheckpointWriter(folder, max_shard_bytes=256 * 2**20) as w:
        w.plan([(n, torch.float32, s) for n, s in shapes.items()])
        for n, s in shapes.items():
            w.write(n, torch.randn(*s, generator=g) * 0.02)
        (w.tmp_dir / "config.json").write_text(json.dumps(cfg))
    return sum(4 * (s[0] * (s[1] if len(s) > 1 else 1)) for s in shapes.values())


def measure(src: Path, dst: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(dst)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_benchmark(layer_counts=(8, 32), dim: int = 1024) -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in layer_counts:
            size = make_llama(Path(tmp) / f"src{n}", n, dim)
            m = measure(Path(tmp) / f"src{n}", Path(tmp) / f"dst{n}")
            out.append({"layers": n, "checkpoint_bytes": size, "peak_bytes": m["peak_kb"] * 1024,
                        "before_bytes": m["before_kb"] * 1024, "edited": m["edited"]})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs=2, default=[8, 32])
    ap.add_argument("--dim", type=int, default=1024)
    args = ap.parse_args(argv)
    res = run_benchmark(args.layers, args.dim)
    mb = 1 / 2**20
    for r in res:
        print(f"layers={r['layers']:3d}  checkpoint={r['checkpoint_bytes'] * mb:8.1f} MiB  peak RSS={r['peak_bytes'] * mb:7.1f} MiB"
              f"  (ROSI adds {(r['peak_bytes'] - r['before_bytes']) * mb:6.1f} MiB)  edited {r['edited']}")
    a, b = res
    print(f"checkpoint size ratio {b['checkpoint_bytes'] / a['checkpoint_bytes']:.2f}x, "
          f"peak RSS ratio {b['peak_bytes'] / a['peak_bytes']:.3f}x")


if __name__ == "__main__":
    main()
