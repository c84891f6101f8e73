"""A torchrun worker for the tests: trains like `charlm train` and, when asked, signals the launcher.

`torchrun ... tests/ddp_worker.py CONFIG_JSON --report DIR [--signal-launcher-at STEP [--launcher-signal SIGINT]]`:
once STEP is logged, rank 0 sends torchrun SIGTERM (as Kubernetes would) or SIGINT (as Ctrl-C would),
then waits until the signal torchrun passes on has reached this process, so the run is interrupted
however fast the machine is.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from charlm.train import train
from charlm.train_config import TrainConfig

STOP = (signal.SIGINT, signal.SIGTERM)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", help="TrainConfig fields as JSON")
    parser.add_argument("--report", required=True, help="folder for each rank's rank<N>.json")
    parser.add_argument("--signal-launcher-at", type=int)
    parser.add_argument("--launcher-signal", choices=("SIGTERM", "SIGINT"), default="SIGTERM")
    args = parser.parse_args()
    cfg = TrainConfig(**json.loads(args.config))

    def progress(row: dict[str, Any]) -> None:
        if "train_bpc" in row and row["step"] == args.signal_launcher_at:
            received: list[int] = []
            trainers = {sig: signal.signal(sig, lambda signum, _: received.append(signum)) for sig in STOP}
            os.kill(os.getppid(), signal.Signals[args.launcher_signal])  # the launcher
            while not received:  # until the signal torchrun passes on reaches this process, however long
                time.sleep(0.01)
            for sig, handler in trainers.items():
                signal.signal(sig, handler)
            signal.raise_signal(received[0])  # now to the trainer's handler

    result = train(cfg, progress)
    rank = int(os.environ["RANK"])
    report = {"rank": rank, "pid": os.getpid(), "step": result.step, "interrupted": result.interrupted}
    Path(args.report, f"rank{rank}.json").write_text(json.dumps(report))
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
