"""DDP on CPU with gloo, two processes: equal to one process on the global batch, identical ranks,
exact resume, and the CLI under torchrun."""
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launch import torchrun
from test_cli import TINY_TRAIN
from tmt_pyg.data import SequenceLoader, associative_recall_corpus, tokens_to_batch
from tmt_pyg.models import TMTConfig, TMTModel
from tmt_pyg.train import Trainer, TrainConfig, load_checkpoint, read_metrics, seed_everything

WORLD, SEQ, BATCH = 2, 32, 2
TRAIN, VAL = associative_recall_corpus(2048, seed=0), associative_recall_corpus(1024, seed=1)


def shard(rank: int, world_size: int) -> SequenceLoader:
    return SequenceLoader(TRAIN.tokens, SEQ, BATCH, seed=0, rank=rank, world_size=world_size)


class GlobalBatches:
    """Every rank's next micro-batch, concatenated: the global batch that one process trains on."""

    def __init__(self, shards: list):
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards[0])

    def __iter__(self):
        for parts in zip(*self.shards):
            yield tokens_to_batch(torch.cat([p.input_ids.view(-1, SEQ) for p in parts]))

    def state_dict(self) -> dict:
        return self.shards[0].state_dict()


def make_trainer(out_dir, rank: int, world_size: int, train_loader=None, dropout: float = 0.0) -> Trainer:
    """Tiny TMT, 4 steps of 2 micro-batches of 2 x 32 tokens per rank, checkpoints at steps 2 and 4."""
    cfg = TrainConfig(steps=4, batch_size=BATCH, seq_len=SEQ, grad_accum=2, lr=3e-3, warmup=1, ckpt_every=2,
                      out_dir=str(out_dir), device="cpu", progress=False, rank=rank, world_size=world_size)
    seed_everything(cfg.seed)
    model = TMTModel(TMTConfig(vocab_size=TRAIN.vocab_size, d_model=32, n_heads=2, n_layers=2, graph_k=4, ffn_stream_dim=32,
                               memory_anchors=4, max_seq_len=SEQ, dropout=dropout))
    val = SequenceLoader(VAL.tokens, SEQ, 4, shuffle=False, drop_last=False, rank=rank, world_size=world_size)
    return Trainer(model, train_loader or shard(rank, world_size), val, cfg)


def _worker(rank: int, tmp) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    try:
        trainer = make_trainer(tmp / "ddp", rank, WORLD)
        result = trainer.fit()
        straight = make_trainer(tmp / "straight", rank, WORLD, dropout=0.1)  # dropout on: the RNG must resume per rank
        straight.fit()
        resumed = make_trainer(tmp / "resumed", rank, WORLD, dropout=0.1)
        resumed.resume(tmp / "straight" / "checkpoints" / "step_00000002.pt")
        resumed.fit()
        torch.save({"model": trainer.model.state_dict(), "val": result, "straight": straight.model.state_dict(),
                    "resumed": resumed.model.state_dict()}, tmp / f"rank{rank}.pt")
        dist.barrier()  # as tmt_pyg.train.distributed does before the teardown
    finally:
        dist.destroy_process_group()


def test_ddp_equals_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(tmp_path,), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for key in ("model", "straight", "resumed"):  # parameters and the anchor EMA buffer agree bit for bit
        for name, a in ranks[0][key].items():
            assert torch.equal(a, ranks[1][key][name]), f"{key}: {name} differs between ranks"
    for name, a in ranks[0]["straight"].items():
        assert torch.equal(a, ranks[0]["resumed"][name]), f"{name} differs after resuming under DDP"
    assert ranks[0]["val"] == ranks[1]["val"]

    reference = make_trainer(tmp_path / "one", 0, 1, GlobalBatches([shard(r, WORLD) for r in range(WORLD)]))
    result = reference.fit()
    diff = {name: float((a - ranks[0]["model"][name]).abs().max()) for name, a in reference.model.state_dict().items()}
    print(f"max abs diff DDP vs one process: {max(diff.values()):.2e} ({max(diff, key=diff.get)})")
    for name, a in reference.model.state_dict().items():
        # the ranks' gradients are summed in another order than one process sums them: float rounding,
        # which Adam's normalised steps carry into the weights (4e-6 seen on an AMD EPYC, with its own BLAS kernels)
        torch.testing.assert_close(ranks[0]["model"][name], a, rtol=1e-5, atol=2e-5, msg=name)
    assert abs(ranks[0]["val"]["loss"] - result["loss"]) < 1e-5 and ranks[0]["val"]["targets"] == result["targets"]
    initial = make_trainer(tmp_path / "fresh", 0, 1).model.anchors.anchor_state
    assert not torch.allclose(ranks[0]["model"]["anchors.anchor_state"], initial)  # the EMA did move (by all-reduced targets)

    state = load_checkpoint(tmp_path / "straight")
    assert state["train_config"]["world_size"] == WORLD and len(state["rng_per_rank"]) == WORLD


TRAIN_ARGS = ["train", "--threads", "1", "--eval-batches", "2", *TINY_TRAIN]
DELAYED = str(Path(__file__).with_name("delayed_rank.py"))
# the collectives of a resumed run of one step (a step that validates and checkpoints), in call order:
# data-preparation barrier, checkpoint reads (CLI, Trainer.resume), the anchor EMA's two all-reduces in
# the forward, step metrics, validation sums, stop agreement, the RNG gather of the checkpoint, final barrier
RESUME_COLLECTIVES = ["barrier:1", "load:1", "load:2", "all_reduce:1", "all_reduce:2", "all_reduce:3", "all_reduce:4",
                      "all_reduce:5", "all_gather_object:1", "barrier:2"]


def train(out, *flags: str, timeout: float = 150, env: Optional[dict] = None, entry: Sequence[str] = ("-m", "tmt_pyg.cli")):
    """``tmt-pyg train`` under torchrun with two processes; fails the test if it does not exit 0."""
    done = torchrun([*entry, *TRAIN_ARGS, "--out", str(out), *flags], timeout=timeout, nproc=WORLD, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def check_resumed(out, done, steps: int = 3) -> None:
    assert done.stdout.count("resumed from") == 1 and "at step 2" in done.stdout
    state = load_checkpoint(out)
    assert state["step"] == steps and state["train_config"]["world_size"] == WORLD
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, steps + 1)) and all(r["tokens"] == WORLD * 4 * 32 for r in train)


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> Path:
    """A run folder checkpointed at step 2 by torchrun."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    first = train(out, "--steps", "2")
    assert first.stdout.count("final validation PPL") == 1 and f"x {WORLD} rank(s)" in first.stdout
    return out


def test_torchrun_cli_train_and_resume(two_steps, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_steps, out)
    check_resumed(out, train(out, "--steps", "3", "--resume"))


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_with_a_rank_late_at_every_collective(two_steps, tmp_path, rank):
    """One rank arrives 1.5 s late at each collective of the resume path: the other waits there (or
    runs ahead to the next one) and the run still ends with the same checkpoint and log."""
    out = tmp_path / "run"
    shutil.copytree(two_steps, out)
    env = {"DELAY_RANK": str(rank), "DELAY_AT": ",".join(RESUME_COLLECTIVES), "DELAY_S": "1.5"}
    done = train(out, "--steps", "3", "--resume", env=env, entry=[DELAYED])
    assert done.stderr.count(f"rank {rank}: ") == len(RESUME_COLLECTIVES), done.stderr[-3000:]  # every delay happened
    check_resumed(out, done)


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("point", RESUME_COLLECTIVES)
def test_resume_with_a_rank_late_at_one_collective(two_steps, tmp_path, point, rank):
    out = tmp_path / "run"
    shutil.copytree(two_steps, out)
    done = train(out, "--steps", "3", "--resume", env={"DELAY_RANK": str(rank), "DELAY_AT": point, "DELAY_S": "8"},
                 entry=[DELAYED])
    check_resumed(out, done)


def test_a_lost_rank_is_an_error_naming_the_collective(two_steps, tmp_path):
    """Rank 1 stalls past --dist-timeout before the stop agreement: rank 0 stops with the trainer's
    message naming that collective and itself, and no process outlives the run."""
    out = tmp_path / "run"
    shutil.copytree(two_steps, out)
    env = {"DELAY_RANK": "1", "DELAY_AT": "all_reduce:5", "DELAY_S": "60"}
    start = time.monotonic()
    done = torchrun([DELAYED, *TRAIN_ARGS, "--out", str(out), "--steps", "3", "--resume", "--dist-timeout", "10"],
                    timeout=150, nproc=WORLD, env=env)
    assert done.returncode != 0
    assert "rank 0 of 2: the all-reduce that agrees on stopping did not complete" in done.stderr, done.stderr[-3000:]
    assert time.monotonic() - start < 100  # the stalled rank is ended by torchrun once rank 0 has failed
