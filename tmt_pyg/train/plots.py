"""PNG plots of a run's ``metrics.jsonl``: train/val loss, val perplexity, exit rate."""
import json
from pathlib import Path


def read_metrics(path) -> list:
    """Records of a JSONL metrics file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_metrics(metrics_path, out_path=None) -> Path:
    """Draw loss, val PPL and exit rate against step into ``out_path`` (default: ``metrics.png`` beside the JSONL)."""
    from matplotlib.figure import Figure  # no pyplot: Agg canvas, no global backend state

    records = read_metrics(metrics_path)
    out_path = Path(out_path or Path(metrics_path).with_name("metrics.png"))
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    fig = Figure(figsize=(15, 4))
    ax_loss, ax_ppl, ax_exit = fig.subplots(1, 3)
    ax_loss.plot([r["step"] for r in train], [r["lm_loss"] for r in train], lw=0.8, alpha=0.7, label="train")
    ax_loss.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val")
    ax_loss.set(title="next-token loss", xlabel="step", ylabel="cross-entropy (nats)")
    ax_ppl.plot([r["step"] for r in val], [r["ppl"] for r in val], "o-", color="C1")
    ax_ppl.set(title="validation perplexity", xlabel="step", ylabel="PPL")
    if val and min(r["ppl"] for r in val) > 0 and max(r["ppl"] for r in val) / min(r["ppl"] for r in val) > 10:
        ax_ppl.set_yscale("log")
    ax_exit.plot([r["step"] for r in train], [r["exit_rate"] for r in train], lw=0.8, label="exit rate (train)")
    ax_exit.plot([r["step"] for r in val], [r["exit_rate"] for r in val], "o-", label="exit rate (val)")
    ax_exit.plot([r["step"] for r in val], [r["work_fraction"] for r in val], "s--", label="work fraction (val)")
    ax_exit.set(title="adaptive exits", xlabel="step", ylim=(-0.02, 1.02))
    for ax in (ax_loss, ax_exit):
        ax.legend(loc="best")
    for ax in (ax_loss, ax_ppl, ax_exit):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    return out_path
