"""Shared helpers of the benchmark scripts: arguments, machine description, timing, profiling,
markdown tables and result files (JSON, markdown, PNG)."""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from tmt_pyg.layers.mesh import import_torch_cluster
from tmt_pyg.report import markdown_table  # noqa: F401  (re-exported for the benchmark scripts)

RESULTS_DIR = Path(__file__).resolve().parents[1] / "docs" / "results"
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"  # the corpora beside the checkout (wikitext-2, ...)


def base_parser(description: str, repeats: int = 5, device: bool = False) -> argparse.ArgumentParser:
    """Arguments every benchmark takes: ``--quick``, ``--threads``, ``--repeats``, ``--out``, ``--seed``;
    ``device``: also ``--device``, where its models and inputs run."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a few seconds; used by the tests)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (torch.set_num_threads)")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed repeats per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON, markdown and PNG results")
    parser.add_argument("--seed", type=int, default=0)
    if device:
        parser.add_argument("--device", default="cpu", help="torch device of the models and inputs: cpu, cuda, cuda:N")
    return parser


def run_study(args: argparse.Namespace, configs: Dict, data: Dict, run_once: Callable, rows) -> List[Dict]:
    """Train every ``args.seeds`` x ``args.rows`` run by ``run_once(row, config, seed, data, args)``
    (which skips runs cached under ``args.runs``; none with ``--table-only``), then return the cached
    results of the known ``rows``."""
    if not args.table_only:
        for seed in args.seeds:
            for row in args.rows:
                run_once(row, configs[row], seed, data, args)
    results = [json.loads(p.read_text()) for p in sorted(args.runs.glob("*_seed*.json"))]
    return [r for r in results if r["row"] in rows]


def seed_groups(results: List[Dict], rows) -> Iterator[Tuple[str, List[Dict]]]:
    """The cached runs of every row (in ``rows`` order) that has any, as ``(row, runs)``."""
    for row in rows:
        mine = [r for r in results if r["row"] == row]
        if mine:
            yield row, mine


def mean_std(values: List[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample standard deviation over seeds (None for a single seed)."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def setup(args: argparse.Namespace) -> Dict:
    """Fix threads and seed, create the output folder; return the machine description."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    return machine_info()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> Dict:
    """What the numbers were measured on, including how busy the machine was at the start."""
    import torch_geometric
    info = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_geometric": torch_geometric.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_start": list(os.getloadavg()),
    }
    torch_cluster = import_torch_cluster(required=False)
    info["torch_cluster"] = None if torch_cluster is None else torch_cluster.__version__
    return info


def machine_markdown(info: Dict) -> str:
    """One markdown line describing the machine and the load before and after the run."""
    def load(values):
        return "/".join(f"{v:.2f}" for v in values)
    end = info.get("load_average_end")
    return (f"Machine: {info['cpu']}, {info['logical_cores']} logical cores, torch {info['torch']} "
            f"({info['torch_threads']} threads), torch-geometric {info['torch_geometric']}, "
            f"torch-cluster {info['torch_cluster']}, Python {info['python']}"
            f"{', GPU ' + info['cuda'] if info['cuda'] else ''}. "
            f"Load average (1/5/15 min) at start {load(info['load_average_start'])}"
            + (f", at end {load(end)}" if end else "") + ".")


def command_line(name: str, argv: Optional[Sequence[str]]) -> str:
    """How to rerun the benchmark ``name`` with the same arguments."""
    return " ".join([f"python -m benchmarks.{name}"] + list(sys.argv[1:] if argv is None else argv))


def time_interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> Dict[str, Dict]:
    """Wall-clock times in ms of every ``fns[name]()``, after ``warmup`` untimed rounds, called
    round-robin (one call of each per round) so that a change of machine load during the run hits
    all candidates alike and their ratios stay fair. Returns per name
    ``{"median_ms", "min_ms", "max_ms", "runs_ms"}``. On CUDA the device is synchronised around calls."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    runs = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            runs[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"median_ms": statistics.median(r), "min_ms": min(r), "max_ms": max(r), "runs_ms": r}
            for name, r in runs.items()}


def check_finite(obj, path: str = "result") -> None:
    """Raise if any number inside ``obj`` (nested dicts/lists) is NaN or infinite."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            check_finite(value, f"{path}.{key}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_finite(value, f"{path}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"non-finite number at {path}: {obj}")


def finish(name: str, args: argparse.Namespace, info: Dict, report: List[str], payload: Dict, figure=None,
           argv: Optional[Sequence[str]] = None, module: Optional[str] = None) -> Dict:
    """Record the end load, print the markdown report (machine, command, ``report`` paragraphs) and
    write ``<name>.json``, ``<name>.md`` and (given a matplotlib ``Figure``) ``<name>.png`` into
    ``args.out``. ``argv``: the arguments ``main`` got (default ``sys.argv[1:]``), for the command
    line shown; ``module``: the script's name in it when the result file is named otherwise (default
    ``name``; e.g. ``"recall --zoology"``). Returns the JSON payload."""
    info["load_average_end"] = list(os.getloadavg())
    command = command_line(module or name, argv)
    text = "\n\n".join([f"## {name}", machine_markdown(info), f"Command: `{command}`"] + report) + "\n"
    print(text)
    result = {"benchmark": name, "command": command, "machine": info,
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, **payload}
    check_finite(result)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(text)
    if figure is not None:
        figure.tight_layout()
        figure.savefig(args.out / f"{name}.png", dpi=100)
    return result


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    """A matplotlib ``Figure`` on the Agg canvas (no pyplot, no global backend state) and its axes."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width * ncols, height))
    axes = fig.subplots(1, ncols)
    return fig, (list(axes) if ncols > 1 else [axes])


# --- profiling ------------------------------------------------------------------------------------

Target = Union[nn.Module, Tuple[object, str]]  # a module, or (owner, name) of a function attribute


@contextmanager
def labelled(labels: Dict[str, Sequence[Target]]):
    """Wrap every call of the given targets in a ``torch.profiler.record_function(label)`` so that a
    profile can be broken down without touching the model code: modules through forward hooks,
    ``(owner, name)`` functions (a bound method of one instance, a module-level function) by
    replacing the attribute for the duration of the block."""
    handles, restore = [], []
    for label, targets in labels.items():
        for target in targets:
            if isinstance(target, nn.Module):
                open_ranges = []

                def enter(mod, inputs, label=label, open_ranges=open_ranges):
                    rng = torch.profiler.record_function(label)
                    rng.__enter__()
                    open_ranges.append(rng)

                def leave(mod, inputs, output, open_ranges=open_ranges):
                    open_ranges.pop().__exit__(None, None, None)

                handles += [target.register_forward_pre_hook(enter), target.register_forward_hook(leave)]
            else:
                owner, name = target
                original = getattr(owner, name)

                def wrapped(*args, label=label, original=original, **kwargs):
                    with torch.profiler.record_function(label):
                        return original(*args, **kwargs)

                restore.append((owner, name, original, name in vars(owner)))
                setattr(owner, name, wrapped)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for owner, name, original, own in reversed(restore):
            if own:
                setattr(owner, name, original)
            else:
                delattr(owner, name)


def profile_breakdown(fn: Callable[[], object], labels: Dict[str, Sequence[Target]], ranges: Sequence[str] = (),
                      runs: int = 3, top_ops: int = 12) -> Dict:
    """Profile ``runs`` calls of ``fn`` and split their wall time by label.

    Labels come from ``labels`` (see :func:`labelled`) and from ``record_function`` ``ranges`` that
    ``fn`` opens itself. Each label gets its *exclusive* time: the time inside its ranges minus the
    time of other labelled ranges nested in them (so nothing is counted twice); ``(other)`` is the
    time outside every label. Times are ms per call and include the profiler's overhead.
    """
    from torch.profiler import ProfilerActivity, profile
    names = list(ranges) + list(labels)
    with labelled(labels):
        fn()  # warm-up outside the profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(runs):
                fn()
            total_ms = (time.perf_counter() - start) * 1e3 / runs

    def nested_labelled(event):
        for child in event.cpu_children:
            if child.name in names:
                yield child
            else:
                yield from nested_labelled(child)

    exclusive = dict.fromkeys(names, 0.0)
    seen = set()
    for event in prof.events():
        if event.name in exclusive:
            seen.add(event.name)
            inner = sum(e.cpu_time_total for e in nested_labelled(event))
            exclusive[event.name] += (event.cpu_time_total - inner) / 1e3 / runs
    rows = [{"label": n, "exclusive_ms": exclusive[n], "share": exclusive[n] / total_ms} for n in names if n in seen]
    other = total_ms - sum(exclusive.values())
    rows.append({"label": "(other)", "exclusive_ms": other, "share": other / total_ms})
    ops = sorted((e for e in prof.key_averages() if e.key not in exclusive),
                 key=lambda e: e.self_cpu_time_total, reverse=True)[:top_ops]
    top = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3 / runs, "calls": e.count // runs,
            "share": e.self_cpu_time_total / 1e3 / runs / total_ms} for e in ops]
    return {"total_ms": total_ms, "breakdown": rows, "top_ops": top}


def breakdown_markdown(profile: Dict, title: str) -> str:
    """Markdown tables of a :func:`profile_breakdown` result."""
    return "\n\n".join([
        f"**{title}** (profiled: {profile['total_ms']:.1f} ms per call incl. profiler overhead; "
        f"exclusive time, a row never includes the time of another row)",
        markdown_table(["part", "ms", "share"], [(r["label"], r["exclusive_ms"], f"{100 * r['share']:.1f} %")
                                                 for r in profile["breakdown"]]),
        markdown_table(["top op (self time)", "ms", "calls", "share"],
                       [(f"`{o['op']}`", o["self_ms"], o["calls"], f"{100 * o['share']:.1f} %")
                        for o in profile["top_ops"]])])


def model_labels(model) -> Dict[str, List[Target]]:
    """Profile labels of the parts of a :class:`tmt_pyg.TMTModel` forward, for :func:`profile_breakdown`."""
    from tmt_pyg.models import layer as layer_module
    blocks = list(model.blocks)
    labels = {
        "mesh kNN": [(model.mesh, "slots")] if model.mesh is not None else [],
        "edge assembly (bidirectional: anchor edges, local ids)": [(b, "layer_edges") for b in blocks] if model.mesh is not None else [],
        "ln_attn (all rows)": [b.ln_attn for b in blocks],
        "attention: K/V projection (all sources)": [m for b in blocks for m in (b.attn.lin_key, b.attn.lin_value)],
        "attention: Q projection": [b.attn.lin_query for b in blocks],
        "attention: output projection": [b.attn.lin_out for b in blocks],
        "attention: mesh slots (gather, softmax with the anchor block, decay)": (
            [(b.attn, "attend_slots") for b in blocks] if model.mesh is not None else []),
        "attention: message passing (bidirectional: gather, scatter softmax, decay)": (
            [b.attn for b in blocks] if model.mesh is not None else []),
        "attention: dense path (SDPA, or scores with decay)": (
            [(layer_module, "dense_causal_attention"), (layer_module, "dense_attention")] if model.mesh is None else []),
        "ln_ffn": [b.ln_ffn for b in blocks],
        "ffn": [b.ffn for b in blocks],
        "exit gates": [b.exit_gate for b in blocks if b.exit_gate is not None],
        "anchor EMA update": [(layer_module, "anchor_ema_step")] if model.anchors is not None else [],
        "gate loss": [(model, "_gate_loss")],
        "lm head (final norm + tied projection)": [(model, "lm_head")],
    }
    # label only what exists: the model code evolves under the benchmarks
    labels = {label: [t for t in targets if isinstance(t, nn.Module) or hasattr(*t)] for label, targets in labels.items()}
    return {label: targets for label, targets in labels.items() if targets}
