"""torchrun entry for the tests: ``tmt_pyg.cli`` with one rank late at chosen collectives.

Rank ``DELAY_RANK`` sleeps ``DELAY_S`` seconds before each call listed in ``DELAY_AT``
(``op:n,op:n,...``: the n-th call of ``op``, a ``torch.distributed`` function or ``load``, the
checkpoint read of ``--resume``), so that the other ranks wait in that collective, or run ahead to
the next one.
"""
import os
import sys
import time

import torch
import torch.distributed as dist

OPS = {"all_reduce": dist, "barrier": dist, "all_gather_object": dist, "load": torch}


def delay(name: str, calls: set, seconds: float) -> None:
    module = OPS[name]
    call, seen = getattr(module, name), [0]

    def late(*args, **kwargs):
        seen[0] += 1
        if seen[0] in calls:
            print(f"rank {os.environ['RANK']}: {name} #{seen[0]} delayed by {seconds:g} s", file=sys.stderr, flush=True)
            time.sleep(seconds)
        return call(*args, **kwargs)

    setattr(module, name, late)


if __name__ == "__main__":
    if os.environ["RANK"] == os.environ["DELAY_RANK"]:
        points = [p.split(":") for p in os.environ["DELAY_AT"].split(",")]
        for name in {op for op, _ in points}:
            delay(name, {int(n) for op, n in points if op == name}, float(os.environ["DELAY_S"]))
    from tmt_pyg.cli import main
    sys.exit(main())
