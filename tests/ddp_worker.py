"""A torchrun worker for the tests: trains like `charlm train` and, when asked, signals the launcher.

`torchrun ... tests/ddp_worker.py CONFIG_JSON [--signal-launcher-at STEP]`: rank 0 sends SIGTERM to
torchrun once STEP is logged, as Kubernetes or a user would, then waits until the signal torchrun
passes back has reached this process, so the run is interrupted however fast the machine is.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

from charlm.train import TrainConfig, train

STOP = {signal.SIGINT, signal.SIGTERM}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", help="TrainConfig fields as JSON")
    parser.add_argument("--signal-launcher-at", type=int)
    args = parser.parse_args()
    cfg = TrainConfig(**json.loads(args.config))

    def progress(row: dict[str, Any]) -> None:
        if "train_bpc" in row and row["step"] == args.signal_launcher_at:
            old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP)
            os.kill(os.getppid(), signal.SIGTERM)  # the launcher
            received = signal.sigwait(STOP)  # what torchrun sends every worker in turn
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            signal.raise_signal(received)  # now to the trainer's handler

    result = train(cfg, progress)
    print(json.dumps({"rank": os.environ["RANK"], "step": result.step, "interrupted": result.interrupted}))
    return 130 if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
