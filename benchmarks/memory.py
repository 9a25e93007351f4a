"""Peak memory of one training step (forward + backward + AdamW step, B=1) against the sequence
length, TMT against a vanilla transformer (SDPA). Every measurement runs in a fresh child process.
Targets: TMT's peak at S=16384 <= 20x its peak at S=1024; the routed TMT's step peak at S=16384 <= vanilla's.

CPU: the child builds the model, optimizer and input, resets its peak-RSS mark
(``/proc/self/clear_refs``; fallback ``getrusage(RUSAGE_SELF).ru_maxrss``), runs the step and reports
``peak RSS during the step - RSS before it``. CUDA: ``torch.cuda.max_memory_allocated`` minus the
memory allocated before the step.

    python -m benchmarks.memory --threads 2
"""
import json
import math
import re
import resource
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a file: make `benchmarks.common` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import base_parser, finish, markdown_table, new_figure, setup
from tmt_pyg import TMTConfig, TMTModel

NAME = "memory"
REPO = Path(__file__).resolve().parents[1]
SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
TARGET_FROM, TARGET_TO, TARGET_RATIO = 1024, 16384, 20.0
MIB, GIB = 2 ** 20, 2 ** 30


def proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(match.group(1)) if match else None
    except OSError:
        return None


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(spec: Dict) -> Dict:
    """One measurement in this process: build, reset the peak mark, one training step."""
    import gc
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    model = TMTModel(TMTConfig.from_dict(spec["config"])).to(device).train()
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, spec["seq_len"]), device=device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    rss_before = proc_status_kib("VmRSS") * 1024
    method = "VmHWM after clear_refs" if reset_peak_rss() else "ru_maxrss"
    start = time.perf_counter()
    model(ids, compute_loss=True).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if method == "ru_maxrss":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    else:
        peak = proc_status_kib("VmHWM") * 1024
    result = {"rss_before_bytes": rss_before, "process_peak_bytes": peak, "step_peak_bytes": peak - rss_before,
              "method": method, "step_seconds": seconds}
    if device.type == "cuda":
        result.update(method="torch.cuda.max_memory_allocated", step_peak_bytes=torch.cuda.max_memory_allocated() - before)
    return result


def run_child(specs: List[Dict], timeout: float) -> List[Dict]:
    """Measure ``specs`` in order in one fresh Python process."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", json.dumps(specs)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed ({[s['seq_len'] for s in specs]}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            return int(re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024
    except (OSError, AttributeError):
        return None


def estimate(done: List[Dict], seq_len: int) -> Optional[float]:
    """Process peak at ``seq_len`` extrapolated from the last two measured sizes (power law in S)."""
    if len(done) < 2:
        return None
    a, b = done[-2], done[-1]
    slope = max(1.0, math.log(max(b["step_peak_bytes"], 1) / max(a["step_peak_bytes"], 1)) / math.log(b["S"] / a["S"]))
    return b["rss_before_bytes"] + b["step_peak_bytes"] * (seq_len / b["S"]) ** slope


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps([child(spec) for spec in json.loads(sys.argv[2])]))
        return {}
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--max-seq", type=int, default=max(SEQ_LENS), help="largest sequence length tried")
    parser.add_argument("--max-gib", type=float, default=16.0, help="skip sizes whose estimated peak exceeds this")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.quick:
        seq_lens = [128, 256]
        size = dict(d_model=64, n_heads=4, n_layers=2, graph_k=4, memory_anchors=4, ffn_stream_dim=128, mlp_dim=256)
    else:
        seq_lens = [s for s in SEQ_LENS if s <= args.max_seq]
        size = dict(d_model=256, n_heads=8, n_layers=4, graph_k=8)
    info = setup(args)
    available = memory_available()
    limit = args.max_gib * GIB if available is None else min(args.max_gib * GIB, 0.8 * available)
    models = {"TMT": TMTConfig(**size), "TMT, routed search": TMTConfig(**size, mesh_search="routed"),
              "vanilla": TMTConfig.vanilla(**size)}

    specs = [(name, {"config": asdict(replace(cfg, max_seq_len=S)), "seq_len": S, "threads": args.threads,
                     "device": args.device}) for name, cfg in models.items() for S in seq_lens]
    rows = []
    if args.quick:  # a smoke test of the code path: one child for all sizes (the allocator reuses freed memory)
        rows = [{"model": name, "S": spec["seq_len"], **r}
                for (name, spec), r in zip(specs, run_child([spec for _, spec in specs], 600))]
    for name, spec in ([] if args.quick else specs):
        S = spec["seq_len"]
        guess = estimate([r for r in rows if r["model"] == name and "step_peak_bytes" in r], S)
        if args.device == "cpu" and guess is not None and guess > limit:
            rows.append({"model": name, "S": S, "skipped": f"estimated peak {guess / GIB:.1f} GiB > limit {limit / GIB:.1f} GiB"})
            continue
        rows.append({"model": name, "S": S, **run_child([spec], 600)[0]})
    measured = [r for r in rows if "step_peak_bytes" in r]
    peak = {(r["model"], r["S"]): r["step_peak_bytes"] for r in measured}
    lo, hi = (TARGET_FROM, TARGET_TO) if not args.quick else (seq_lens[0], seq_lens[-1])
    ratios = {name: peak[(name, hi)] / peak[(name, lo)] for name in models
              if (name, hi) in peak and peak.get((name, lo), 0) > 0}
    target = ratios.get("TMT")

    report = [              f"One training step (forward + backward + AdamW step incl. its first-step state), B=1, "
              f"d={size['d_model']}, {size['n_layers']} layers, {size['n_heads']} heads, k={size['graph_k']}, "
              f"device {args.device}; a fresh child process per row. `step peak` = peak RSS during the step minus "
              f"RSS before it (model, optimizer and input built). Size limit {limit / GIB:.1f} GiB "
              f"(min of --max-gib and 80 % of MemAvailable at start)."
              + (" **Quick mode: all sizes in one process, so later rows reuse freed memory; a smoke test, "
                 "not a measurement.**" if args.quick else ""),
              markdown_table(["model", "S", "step peak MiB", "process peak MiB", "RSS before MiB", "step s", "method"],
                             [(r["model"], r["S"], r["step_peak_bytes"] / MIB, r["process_peak_bytes"] / MIB,
                               r["rss_before_bytes"] / MIB, r["step_seconds"], r["method"]) if "step_peak_bytes" in r
                              else (r["model"], r["S"], "skipped: " + r["skipped"], "", "", "", "") for r in rows]),
              markdown_table(["model", f"step peak S={hi} / S={lo}"], [(n, f"{v:.2f}x") for n, v in ratios.items()])]
    if target is None:
        report.append(f"Target (TMT peak at S={hi} <= {TARGET_RATIO}x S={lo}): **not measured** (size skipped or "
                      f"above --max-seq).")
    else:
        report.append(f"Target: TMT step peak at S={hi} <= {TARGET_RATIO}x that at S={lo}: {target:.2f}x, "
                      f"**{'holds' if target <= TARGET_RATIO else 'missed'}**.")

    fig, (ax,) = new_figure()
    for name in models:
        mine = [r for r in measured if r["model"] == name]
        ax.plot([r["S"] for r in mine], [r["step_peak_bytes"] / MIB for r in mine], "o-", label=name)
    ax.set(xscale="log", yscale="log", xlabel="sequence length S (B=1)", ylabel="step peak (MiB)",
           title=f"training-step peak memory, {args.device}")
    ax.grid(alpha=0.3)
    ax.legend()
    return finish(NAME, args, info, report, {"configs": {n: asdict(c) for n, c in models.items()}, "rows": rows,
                                             "ratios": ratios, "target_ratio": target, "limit_bytes": limit}, fig, argv=argv)


if __name__ == "__main__":
    main()
