"""Training state that survives a crash at any moment: atomic file writes, the crash backup
that `fit` resumes from, and the per-epoch weight checkpoints it falls back to.

A SIGKILL or a power loss can land in the middle of any write. Every file here is written to
a temporary file beside its final name, flushed to disk and renamed over that name, so the
name holds either the old complete file or the new one, never a partial one.

Weights holding NaN or infinity (a diverged run) are never written: the backup and the
epoch checkpoints keep the last finite ones.
"""

import contextlib
import json
import logging
import os
import re
import shutil
import time
import warnings
import zlib

import keras

from ifa_tf import diagnostics

TEMP_PREFIX = ".tmp-"
CORRUPT_SUFFIX = ".corrupt"
CHECKPOINT_FORMAT = "epoch-{epoch:04d}.weights.h5"
_CHECKPOINT_NAME = re.compile(r"epoch-(\d+)\.weights\.h5")
# Keras's names for the latest pair, so a backup written by plain Keras is restored too.
# Not its `double_checkpoint` names for the previous pair ("*.bkp"): `load_weights` accepts
# only a ".weights.h5" ending.
_LATEST = ("latest.weights.h5", "training_metadata.json")
_PREVIOUS = ("previous.weights.h5", "previous_training_metadata.json")
_CRC_KEY = "weights_crc32"
_logger = logging.getLogger(__name__)


class TrainingDivergedError(ValueError):
    """Training produced a NaN or infinite loss or weights; nothing trained was saved."""


def diverged(model, what):
    """Whether `model`'s weights hold NaN or infinity; if so, logs that `what` is not
    written."""
    found = diagnostics.non_finite_weights(model)
    if found:
        _logger.warning("Not writing %s: %d weights hold NaN or infinite values (%s)", what,
                        len(found), ", ".join(list(found)[:3]))
    return bool(found)


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
    # A leftover of a crash may be a hard link to a live file (see `_keep_previous`):
    # writing into it would truncate that file too.
    _remove_if_exists(temporary)
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


class ChiefBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` that a crash at any moment cannot break, for clusters.

    Every worker restores from `backup_dir`; only the chief writes it (and finally deletes
    it). Model weights are read locally, so skipping the save on other workers needs no
    collective step.

    The latest pair keeps Keras's names, `latest.weights.h5` and `training_metadata.json`;
    the one before it is `previous.weights.h5` and `previous_training_metadata.json`. Unlike
    Keras, every file is written atomically, the previous pair is kept by hard links rather
    than 60 MB copies, and the metadata records the CRC-32 of its weights file, so a pair
    that a crash left half-renamed (new weights, old epoch) is recognised instead of
    resuming at the wrong epoch.

    Restoring tries the latest pair, then the previous one, then the most recently written
    readable `checkpoint_dir/epoch-XXXX.weights.h5` (`EpochCheckpoint`), and resumes after
    that epoch. Each unreadable file is logged with its path and renamed aside to
    `<name>.corrupt-<time>`, where a person can inspect it (the chief's deletion of the
    backup at the end of training leaves it). With nothing readable, training starts from
    epoch 0, with a warning. A readable file whose variables do not fit the model is an
    error naming the file: that is a changed config, not a crash.
    """

    def __init__(self, backup_dir, chief=True, checkpoint_dir=None, **kwargs):
        super().__init__(backup_dir, **kwargs)
        self.chief = chief
        self.checkpoint_dir = checkpoint_dir
        self._latest = tuple(os.path.join(backup_dir, name) for name in _LATEST)
        self._previous = tuple(os.path.join(backup_dir, name) for name in _PREVIOUS)

    def on_train_begin(self, logs=None):
        # Replaces Keras's restore, which raises on an unreadable backup (on every rerun,
        # naming no file) and trusts a weights file and an epoch that a crash may have left
        # from different epochs.
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)  # the files hold its variables
        restored = self._restore()
        if restored is not None:
            path, epoch = restored
            self.model._initial_epoch = epoch
            _logger.info("Resumed from %s at epoch %d", path, epoch)

    def _restore(self):
        """Loads the newest readable training state into the model; returns `(path,
        epoch)`, or None to start from epoch 0."""
        unreadable = []
        for pair in (self._latest, self._previous):
            if not any(os.path.exists(path) for path in pair):
                continue
            try:
                return pair[0], self._load_backup(*pair)
            except _UnreadableError as error:
                unreadable.append(error.path)
                self._set_aside(pair, error)
        if not unreadable:
            return None  # no backup: a fresh run
        for path, epoch in _checkpoints_newest_first(self.checkpoint_dir):
            try:
                _load_weights(self.model, path)
                return path, epoch
            except _UnreadableError as error:
                unreadable.append(path)
                _logger.warning("Checkpoint %s is unreadable (%s); skipped.", path,
                                error.reason)
        _logger.warning("No readable training state (unreadable: %s); training starts "
                        "from epoch 0.", ", ".join(unreadable))
        return None

    def _load_backup(self, weights_path, metadata_path):
        """Loads a backup pair's weights into the model; returns its epoch."""
        try:
            with open(metadata_path) as f:
                metadata = json.load(f)
            epoch = int(metadata["epoch"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise _UnreadableError(metadata_path, repr(error)) from error
        if not os.path.exists(weights_path):
            raise _UnreadableError(weights_path, "missing")
        # Plain Keras records no CRC; its weights are checked by loading them.
        recorded = metadata.get(_CRC_KEY)
        if recorded is not None and recorded != _crc32(weights_path):
            raise _UnreadableError(weights_path, f"its CRC-32 is not {recorded}, the one "
                                   f"recorded in {metadata_path}")
        _load_weights(self.model, weights_path)
        return epoch

    def _set_aside(self, pair, error):
        if not self.chief:
            _logger.warning("Backup %s is unreadable (%s).", error.path, error.reason)
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = []
        for path in pair:
            if os.path.exists(path):
                os.replace(path, f"{path}{CORRUPT_SUFFIX}-{stamp}")
                moved.append(f"{path}{CORRUPT_SUFFIX}-{stamp}")
        _logger.warning("Backup %s is unreadable (%s); set aside as %s.", error.path,
                        error.reason, ", ".join(moved))

    def _save_model(self):
        if not self.chief or diverged(self.model, f"the backup in {self.backup_dir}"):
            return
        os.makedirs(self.backup_dir, exist_ok=True)
        # Every step leaves at least one complete pair: the previous pair is linked to the
        # latest (now both hold epoch N), then the weights and finally the metadata of
        # epoch N + 1 replace the latest; between the two, the CRC tells the torn pair.
        if all(os.path.exists(path) for path in self._latest):
            for path, previous in zip(self._latest, self._previous):
                _keep_previous(path, previous)
        weights_path, metadata_path = self._latest
        with atomic_write(weights_path) as temporary:
            self.model.save_weights(temporary, overwrite=True)
            crc = _crc32(temporary)
        write_text(metadata_path, json.dumps({"epoch": self._current_epoch,
                                              "batch": self._last_batch_seen,
                                              _CRC_KEY: crc}))

    def on_train_end(self, logs=None):
        # Keras deletes the whole directory; files set aside as corrupt stay.
        if not (self.chief and self.delete_checkpoint and os.path.isdir(self.backup_dir)):
            return
        for name in os.listdir(self.backup_dir):
            if CORRUPT_SUFFIX not in name:
                os.remove(os.path.join(self.backup_dir, name))
        if not os.listdir(self.backup_dir):
            os.rmdir(self.backup_dir)


class EpochCheckpoint(keras.callbacks.Callback):
    """Writes `epoch-XXXX.weights.h5` (1-based epoch) every `every` epochs, atomically."""

    def __init__(self, directory, every=1):
        super().__init__()
        self.directory = directory
        self.every = every

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every == 0:
            path = os.path.join(self.directory, CHECKPOINT_FORMAT.format(epoch=epoch + 1))
            if diverged(self.model, path):
                return
            os.makedirs(self.directory, exist_ok=True)
            with atomic_write(path) as temporary:
                self.model.save_weights(temporary, overwrite=True)


class _UnreadableError(Exception):
    def __init__(self, path, reason):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def _load_weights(model, path):
    """Loads the file's weights into `model`, or raises: Keras only warns when the file
    lacks a nested layer's weights and leaves that layer as initialised, which here is a
    file that does not fit (a resume would go on with part of the model untrained)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(path)
        except OSError as error:  # h5py: missing, truncated or not an HDF5 file
            raise _UnreadableError(path, str(error)) from error
        except ValueError as error:
            raise _does_not_fit(path, error) from error
    skipped = [w for w in caught if _SKIPPED_LAYER in str(w.message)]
    if skipped:
        raise _does_not_fit(path, skipped[0].message)
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename,
                               warning.lineno)


_SKIPPED_LAYER = "Skipping nested container"  # keras.src.saving.saving_lib's warning


def _does_not_fit(path, reason):
    return ValueError(f"{path} does not fit this model (was its config changed? Use another "
                      f"model_dir or delete the file): {reason}")


def _checkpoints_newest_first(directory):
    """`(path, epoch)` of every `EpochCheckpoint` file in `directory`, most recently written
    first: a rerun in the same directory rewrites the same names, so the modification time,
    not the epoch in the name, tells which file belongs to the latest run."""
    if not directory or not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _CHECKPOINT_NAME.fullmatch(name)
        if match:
            path = os.path.join(directory, name)
            found.append((os.stat(path).st_mtime_ns, int(match.group(1)), path))
    return [(path, epoch) for _, epoch, path in sorted(found, reverse=True)]


def _keep_previous(path, previous):
    """Makes `previous` a second name of `path`'s current file, atomically: a hard link
    (no copy of a large file), or a copy where the file system has no hard links."""
    with atomic_write(previous) as temporary:
        try:
            os.link(path, temporary)
        except OSError:
            shutil.copyfile(path, temporary)


def _crc32(path):
    crc = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            crc = zlib.crc32(block, crc)
    return crc


def _fsync(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove_if_exists(path):
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
