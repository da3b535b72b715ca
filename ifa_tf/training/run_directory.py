"""What an `ifa-train` run directory holds, read without TensorFlow (`ifa-train` checks it
before TensorFlow loads): whether training in it would overwrite a finished run.

A run resumes from its crash backup (`backup/`, see `checkpointing.ChiefBackupAndRestore`),
which it removes once training has finished. A directory with a finished run's results and
no backup is refused: training there would start from epoch 0 and overwrite its history,
model and metrics. (With a backup that is damaged beyond reading, training starts again
from a checkpoint or from epoch 0 with a warning: that run never finished.)
"""

import json
import os

METRICS_FILENAME = "metrics.json"  # trainer.METRICS_FILENAME (tested equal)
HISTORY_FILENAME = "history.jsonl"  # trainer.HISTORY_FILENAME (tested equal)
BACKUP_DIRNAME = "backup"
# The files of `checkpointing.ChiefBackupAndRestore` (tested equal): any of them is a
# backup to resume from.
BACKUP_FILES = ("latest.weights.h5", "training_metadata.json", "previous.weights.h5",
                "previous_training_metadata.json")


class FinishedRunError(ValueError):
    """Training would start from epoch 0 over a finished run's results."""


def finished_run_files(workdir):
    """The results of a finished run in `workdir` that training would overwrite, when it
    has no backup to resume from: `metrics.json`, and `history.jsonl` when it records an
    epoch. Empty when there is a backup, or nothing finished."""
    backup = os.path.join(workdir, BACKUP_DIRNAME)
    if any(os.path.exists(os.path.join(backup, name)) for name in BACKUP_FILES):
        return []
    found = []
    if os.path.exists(os.path.join(workdir, METRICS_FILENAME)):
        found.append(METRICS_FILENAME)
    epochs = _history_epochs(os.path.join(workdir, HISTORY_FILENAME))
    if epochs:
        found.append(f"{HISTORY_FILENAME} ({epochs} epoch{'s' if epochs > 1 else ''})")
    return found


def check_not_finished(workdir):
    """Raises `FinishedRunError` (one line naming the directory and the files) when
    training in `workdir` would overwrite a finished run (`finished_run_files`)."""
    found = finished_run_files(workdir)
    if found:
        names = " and ".join(name.split(" ")[0] for name in found)
        raise FinishedRunError(
            f"{workdir} holds a finished run ({', '.join(found)}) and no backup to resume "
            "from (a run removes it once training has finished): training here would start "
            f"from epoch 0 and overwrite it. Use a new --model_dir, or delete {names} to "
            "train again in this one.")


def _history_epochs(path):
    """The number of epoch lines of a history.jsonl (0 when missing or unreadable)."""
    try:
        with open(path) as f:
            return sum(1 for line in f if line.strip() and "epoch" in json.loads(line))
    except (OSError, ValueError):
        return 0
