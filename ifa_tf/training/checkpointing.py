"""Training files that survive a crash at any moment: atomic file writes and the per-epoch
weight checkpoints.

A SIGKILL or a power loss can land in the middle of any write. Every file here is written to
a temporary file beside its final name, flushed to disk and renamed over that name, so the
name holds either the old complete file or the new one, never a partial one.
"""

import contextlib
import os

import keras

TEMP_PREFIX = ".tmp-"
CHECKPOINT_FORMAT = "epoch-{epoch:04d}.weights.h5"


@contextlib.contextmanager
def atomic_write(path):
    """Yields a temporary path beside `path` to write; once the block succeeds, flushes the
    file to disk and renames it onto `path`. On an error the temporary file is removed and
    `path` keeps its old content.

    The temporary name ends with `path`'s name, so writers that check the extension
    (`save_weights`: ".weights.h5", `save`: ".keras") accept it. It is fixed, so a crash
    leaves at most one stray file per name; one writer per path at a time.
    """
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, TEMP_PREFIX + name)
    _remove_if_exists(temporary)  # a crash's leftover
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, path)
    except BaseException:
        _remove_if_exists(temporary)
        raise
    _fsync(directory)  # makes the rename itself durable


def write_text(path, text):
    """Writes `text` to `path` atomically (see `atomic_write`)."""
    with atomic_write(path) as temporary, open(temporary, "w") as f:
        f.write(text)


class EpochCheckpoint(keras.callbacks.Callback):
    """Writes `epoch-XXXX.weights.h5` (1-based epoch) every `every` epochs, atomically."""

    def __init__(self, directory, every=1):
        super().__init__()
        self.directory = directory
        self.every = every

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0:
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, CHECKPOINT_FORMAT.format(epoch=epoch + 1))
            with atomic_write(path) as temporary:
                self.model.save_weights(temporary, overwrite=True)


def _fsync(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_if_exists(path):
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
