"""Run by test_distributed.py under torchrun: trains a config and records, on every process, the
multipliers it holds after each dual step (rank{R}.jsonl beside the run directory); then trains it again,
which every process must refuse (refused{R}.txt) rather than one going on to wait for the other."""

import json
import sys
from pathlib import Path

from accelerate import Accelerator

import condiff
from condiff.config import load_config
from condiff.rundir import RunDirectoryError

config_path, record_dir = sys.argv[1], Path(sys.argv[2])
# Accelerator, not a bare PartialState: only Accelerator reads ACCELERATE_USE_CPU, and without it the
# processes would each run alone as rank 0.
accelerator = Accelerator()
rank = accelerator.process_index
assert accelerator.num_processes == 2, accelerator.num_processes
with open(record_dir / f"rank{rank}.jsonl", "w") as out:
    def record_multipliers(record):
        if record["dual_step"]:
            out.write(json.dumps({"step": record["step"], "multipliers": record["multipliers"]}) + "\n")
    condiff.train(load_config(config_path), on_step=record_multipliers, accelerator=accelerator).path
try:
    condiff.train(load_config(config_path), accelerator=accelerator)
except RunDirectoryError as refused:
    (record_dir / f"refused{rank}.txt").write_text(str(refused))
