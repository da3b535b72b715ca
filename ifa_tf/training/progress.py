"""`fit` progress for the person at the terminal, in place of Keras' own display (whose bar
carries every metric, ~330 columns for four tasks, and writes ANSI codes into logs).

- verbose 1 on a terminal: a bar per epoch (`ifa_tf.progress.ProgressBar`, at most 100
  columns) with the running loss, then the epoch's line;
- verbose 2, or 1 when stdout is not a terminal: the epoch's line only;
- the epoch's line: steps, time, loss and the ranking task's AUC, for training and
  validation, cut to 100 columns. Every metric is in TensorBoard and metrics.json.
"""

import sys
import time

import keras

from ifa_tf.progress import ProgressBar, fit_line, format_duration, terminal_columns


class FitProgress(keras.callbacks.Callback):
    """Shows `fit`'s progress (pass `verbose=0` to `fit`).

    Args:
        verbose: 1 (a bar on a terminal, epoch lines elsewhere) or 2 (epoch lines).
        score_task: the task whose AUC the epoch lines show.
        stream: where to write (default stdout).
    """

    def __init__(self, verbose, score_task, stream=None):
        super().__init__()
        if verbose not in (1, 2):
            raise ValueError(f"verbose must be 1 or 2. Received: verbose={verbose!r}")
        self.verbose = verbose
        self.score_task = score_task
        self.stream = stream or sys.stdout
        self._bar = None
        self._epoch_start = 0.0
        self._epoch = 0

    @property
    def _dynamic(self):
        return self.verbose == 1 and self.stream.isatty()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._epoch_start = time.monotonic()
        if self._dynamic:
            self._bar = ProgressBar(self.params.get("steps"), "step", self._prefix(),
                                    self.stream)

    def on_train_batch_end(self, batch, logs=None):
        if self._bar is not None:
            loss = (logs or {}).get("loss")
            self._bar.update(batch + 1, "" if loss is None else f"loss {float(loss):.4f}")

    def on_epoch_end(self, epoch, logs=None):
        if self._bar is not None:
            self._bar.stream.write("\r" + " " * (terminal_columns(self.stream) - 1) + "\r")
            self._bar = None
        self.stream.write(self.epoch_line(logs or {}, time.monotonic() - self._epoch_start)
                          + "\n")
        self.stream.flush()

    def epoch_line(self, logs, seconds, steps=None, columns=None):
        """`epoch 1/3: 120 steps in 0:12, loss 0.4123, click_auc 0.7012, val_loss ...`."""
        steps = steps if steps is not None else self.params.get("steps")
        parts = [f"{self._prefix()}: " + (f"{steps} steps in " if steps else "")
                 + format_duration(seconds)]
        for key in ("loss", f"{self.score_task}_auc", "val_loss",
                    f"val_{self.score_task}_auc"):
            if key in logs:
                parts.append(f"{key} {float(logs[key]):.4f}")
        return fit_line(", ".join(parts), columns or terminal_columns(self.stream))

    def _prefix(self):
        return f"epoch {self._epoch + 1}/{self.params.get('epochs', '?')}"
