"""`train_and_evaluate(config, workdir)`: train a zoo model on TFRecords and evaluate it.

What lands in `workdir` (written by the chief only):

    config.yaml                 the resolved config (written once training begins: a resume
                                refused because the config changed leaves the old one)
    backup/                     crash backup (every epoch, see `ChiefBackupAndRestore`): a
                                restarted run resumes from the last finished epoch, or from
                                the newest readable checkpoint if the backup is damaged;
                                removed when training completes
    checkpoints/epoch-XXXX.weights.h5
    logs/                       TensorBoard (train/, validation/ and evaluation/ scalars)
    progress.jsonl              one line per epoch started: {"epoch", "initial_epoch", "pid"}
    history.jsonl               one line per epoch finished: {"epoch", loss and metrics}; a
                                resumed run keeps the lines of the epochs it resumes after
    model.keras                 the trained model
    metrics.json                evaluation metrics per task (see `ifa_tf.metrics`), the
                                training history, steps and wall time

Every file but the append-only `progress.jsonl`, `history.jsonl` and TensorBoard's is written
atomically (`checkpointing.atomic_write`): a crash leaves the old file or the new one, never a
part.

A run whose loss or weights become NaN or infinite raises `TrainingDivergedError` and writes
no `model.keras`, `metrics.json` or checkpoint of the diverged weights.

A directory holding a finished run (its metrics.json, or history.jsonl with an epoch) and no
backup is refused (`run_directory.check_not_finished`): training again would start from
epoch 0 and overwrite it.
"""

import json
import math
import os
import shutil
import sys
import tempfile
import time

import keras
import tensorflow as tf

from ifa_tf import diagnostics, zoo
from ifa_tf.data import make_dataset, records
from ifa_tf.metrics import CandidateSetEvaluator
from ifa_tf.progress import ProgressBar
from ifa_tf.schema import resolve_schema
from ifa_tf.training import run_directory, strategies
from ifa_tf.training.progress import FitProgress
from ifa_tf.training.checkpointing import (ChiefBackupAndRestore, EpochCheckpoint,
                                           TrainingDivergedError, atomic_write, write_text)
from ifa_tf.training.streaming import streaming_train_and_evaluate

CONFIG_FILENAME = "config.yaml"
METRICS_FILENAME = "metrics.json"
MODEL_FILENAME = "model.keras"
PROGRESS_FILENAME = "progress.jsonl"
HISTORY_FILENAME = "history.jsonl"


def load_schema(config):
    """The schema of the run: `data.schema` if set, else the metadata beside the data."""
    if config.data.schema:
        return resolve_schema(config.data.schema)
    files = records.expand_file_pattern(config.data.train_data)
    metadata = records.find_metadata(files)
    if metadata is None:
        raise ValueError(f"No {records.METADATA_FILENAME} beside {files[0]!r}; set "
                         "data.schema to a schema JSON file.")
    return records.schema_from_metadata(metadata)


def build_model(config, schema):
    """The zoo model of `config`, compiled with the paper's loss and the configured
    optimizer (call inside the strategy's scope)."""
    model = zoo.build(config.model.name, schema=schema, **config.model.overrides)
    optimizer = keras.optimizers.get({"class_name": config.train.optimizer,
                                      "config": {"learning_rate": config.train.learning_rate}})
    model.compile(optimizer=optimizer)
    return model


def evaluate(model, dataset, schema, ndcg_k=10, max_batches=None, length_groups=0,
             verbose=0):
    """Runs `model` over `(features, labels[, extras])` batches; returns
    `ifa_tf.metrics.CandidateSetEvaluator.result()` as `tasks`, `num_requests` and, with
    `length_groups`, the AUC per group of sequence length as `by_sequence_length`.
    `verbose=1` shows a progress bar over the batches."""
    evaluator = CandidateSetEvaluator(schema.tasks, ndcg_k=ndcg_k, length_groups=length_groups)
    predict = tf.function(lambda features: model(features, training=False),
                          reduce_retracing=True)
    progress = None
    if verbose == 1 and sys.stdout.isatty():
        batches = int(dataset.cardinality())
        batches = None if batches < 0 else batches
        if max_batches is not None:
            batches = max_batches if batches is None else min(batches, max_batches)
        progress = ProgressBar(batches, "batch", "evaluation")
    for index, batch in enumerate(dataset):
        if max_batches is not None and index >= max_batches:
            break
        features, labels = batch[0], batch[1]
        extras = batch[2] if len(batch) > 2 else None
        evaluator.update(features, labels, predict(features), extras)
        if progress is not None:
            progress.update(index + 1)
    if progress is not None:
        progress.close()
    return _evaluation(evaluator)


def _evaluation(evaluator):
    result = {"num_requests": evaluator.num_requests, "tasks": evaluator.result()}
    if evaluator.length_groups:
        result["by_sequence_length"] = evaluator.length_group_result()
    return result


def train_and_evaluate(config, workdir, callbacks=()):
    """Trains `config.model` on `config.data.train_data` and evaluates it by
    `config.eval.protocol`; writes everything listed in the module docstring into `workdir`.

    `callbacks`: extra Keras callbacks for `fit` (`split` protocol).

    Returns the metrics dict that is written to `metrics.json`.
    """
    config.validate()
    started = time.time()
    chief = strategies.is_chief()
    run_directory.check_not_finished(workdir)
    # Non-chief workers write into a throwaway directory (files are written by the chief
    # only) but read the chief's backup, so that every worker resumes from the same epoch.
    write_dir = workdir if chief else tempfile.mkdtemp(prefix="ifa_train_worker_")
    os.makedirs(write_dir, exist_ok=True)
    # MultiWorkerMirroredStrategy must exist before other TensorFlow ops run.
    strategy = strategies.make_strategy(config.train.strategy)
    keras.utils.set_random_seed(config.train.seed)
    if config.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    schema = load_schema(config)
    with strategy.scope():
        model = build_model(config, schema)
    if config.train.strategy != "default":
        _build_from_local_replica(model)

    try:
        if config.eval.protocol == "streaming":
            if chief:
                write_text(os.path.join(workdir, CONFIG_FILENAME), config.to_yaml())
            result = _streaming(config, model, schema, write_dir)
        else:
            result = _split(config, model, schema, strategy, workdir, write_dir, chief,
                            list(callbacks))
        result.update({"model": config.model.name, "protocol": config.eval.protocol,
                       "seed": config.train.seed, "num_parameters": model.count_params(),
                       "wall_time_s": round(time.time() - started, 2)})
        _check_finite_weights(model, config)
        if chief:
            with atomic_write(os.path.join(workdir, MODEL_FILENAME)) as temporary:
                model.save(temporary)
            write_text(os.path.join(workdir, METRICS_FILENAME),
                       json.dumps(result, indent=2, sort_keys=True, default=_json_default))
        return result
    finally:
        if not chief:
            shutil.rmtree(write_dir, ignore_errors=True)


def _split(config, model, schema, strategy, workdir, write_dir, chief, extra_callbacks):
    data, train = config.data, config.train
    steps_per_epoch = train.steps_per_epoch
    verbose = train.resolved_verbose

    def train_input(input_context=None):
        return make_dataset(data.train_data, schema=schema, batch_size=data.batch_size,
                            shuffle=True, shuffle_buffer=data.shuffle_buffer,
                            seed=train.seed, repeat=steps_per_epoch is not None,
                            deterministic=train.deterministic,
                            max_seq_len=data.max_seq_len, max_candidates=data.max_candidates,
                            max_record_bytes=data.max_record_bytes,
                            group_by_length=data.group_by_length, input_context=input_context)

    if train.strategy == "default":
        train_dataset = train_input()
    else:
        train_dataset = strategy.distribute_datasets_from_function(train_input)
    validation = None
    if data.eval_data and train.strategy == "default":
        validation = make_dataset(data.eval_data, schema=schema,
                                  batch_size=data.eval_batch_size or data.batch_size,
                                  shuffle=False, max_seq_len=data.max_seq_len,
                                  max_candidates=data.max_candidates,
                                  max_record_bytes=data.max_record_bytes,
                                  group_by_length=data.group_by_length)
    # Every worker falls back to the chief's checkpoints, the ones this run writes.
    checkpoint_dir = (os.path.join(workdir, "checkpoints") if train.checkpoint_every_epochs
                      else None)
    divergence = StopOnNonFiniteLoss()
    history = EpochHistory(os.path.join(write_dir, HISTORY_FILENAME))
    callbacks = [
        # Before the backup: an epoch's history line is written before the backup says the
        # epoch is done, so a kill between the two cannot lose the line.
        history,
        ChiefBackupAndRestore(os.path.join(workdir, "backup"), chief=chief,
                              checkpoint_dir=checkpoint_dir),
        # After the restore: a resume it refuses (a changed config) keeps the old file.
        WriteOnTrainBegin(os.path.join(write_dir, CONFIG_FILENAME), config.to_yaml()),
        divergence,
        ProgressLog(os.path.join(write_dir, PROGRESS_FILENAME)),
        keras.callbacks.TensorBoard(os.path.join(write_dir, "logs")),
    ]
    if train.checkpoint_every_epochs:
        callbacks.append(EpochCheckpoint(os.path.join(write_dir, "checkpoints"),
                                         train.checkpoint_every_epochs))
    if verbose:
        # Keras' own display is ~330 columns for four tasks, with ANSI codes, in logs too.
        callbacks.append(FitProgress(verbose, schema.score_task))
    # shuffle=False: the dataset shuffles examples itself; Keras cannot shuffle a dataset.
    model.fit(train_dataset, epochs=train.epochs, steps_per_epoch=steps_per_epoch,
              validation_data=validation, callbacks=callbacks + extra_callbacks,
              shuffle=False, verbose=0)
    if divergence.diverged_at is not None:
        epoch, batch, loss = divergence.diverged_at
        raise TrainingDivergedError(
            f"Training diverged: the loss became {loss} at epoch {epoch + 1}, batch "
            f"{batch + 1} (learning_rate={config.train.learning_rate:g}); no model.keras, "
            "metrics.json or checkpoint of the diverged weights was written. Lower "
            "train.learning_rate (--learning_rate) and train again.")
    result = {"history": history.result(),
              "train_steps": int(model.optimizer.iterations.numpy())}
    if data.eval_data:
        with_extras = bool(schema.extras)
        eval_dataset = make_dataset(data.eval_data, schema=schema,
                                    batch_size=data.eval_batch_size or data.batch_size,
                                    shuffle=False, max_seq_len=data.max_seq_len,
                                    max_candidates=data.max_candidates,
                                    max_record_bytes=data.max_record_bytes,
                                    group_by_length=data.group_by_length,
                                    with_extras=with_extras)
        result["eval"] = evaluate(model, eval_dataset, schema, config.eval.ndcg_k,
                                  config.eval.max_batches, config.eval.length_groups,
                                  verbose=verbose)
        if chief:
            _write_scalars(os.path.join(write_dir, "logs", "evaluation"), result["eval"],
                           step=result["train_steps"])
    return result


def _streaming(config, model, schema, write_dir):
    data = config.data
    dataset = make_dataset(data.train_data, schema=schema, batch_size=data.batch_size,
                           shuffle=False, deterministic=True, max_seq_len=data.max_seq_len,
                           max_candidates=data.max_candidates,
                           max_record_bytes=data.max_record_bytes,
                           with_extras=bool(schema.extras))
    if config.train.steps is not None:
        dataset = dataset.take(config.train.steps)
    evaluator = CandidateSetEvaluator(schema.tasks, ndcg_k=config.eval.ndcg_k,
                                      length_groups=config.eval.length_groups)
    losses = streaming_train_and_evaluate(model, dataset, evaluator,
                                          epochs=config.train.epochs)
    result = {"eval": _evaluation(evaluator),
              "history": {"loss": losses},
              "train_steps": int(model.optimizer.iterations.numpy())}
    _write_scalars(os.path.join(write_dir, "logs", "evaluation"), result["eval"],
                   step=result["train_steps"])
    return result


def _check_finite_weights(model, config):
    """Raises `TrainingDivergedError` when a weight holds NaN or infinity (the loss may
    still have been finite at the last step)."""
    found = diagnostics.non_finite_weights(model)
    if found:
        shown = ", ".join(f"{path}: {count} of {size}" for path, (count, size) in
                          list(found.items())[:3])
        raise TrainingDivergedError(
            f"Training diverged: {len(found)} weights hold NaN or infinite values ({shown}"
            f"{', ...' if len(found) > 3 else ''}; learning_rate="
            f"{config.train.learning_rate:g}); no model.keras or metrics.json was written. "
            "Lower train.learning_rate (--learning_rate) and train again.")


def _build_from_local_replica(model):
    """Works around Keras 3's distributed `fit` on dict inputs: before the first step it
    builds the model from one batch averaged across replicas with `strategy.reduce`, which
    `MultiWorkerMirroredStrategy` cannot do for a dict of int64 features ("Attempt to
    convert a value ({'user_id': PerReplica...")). Building needs only shapes and dtypes,
    so this builds from the first local replica's batch instead (no collective step)."""
    strategy = model.distribute_strategy

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(
                    lambda value: (strategy.experimental_local_results(value)[0]
                                   if isinstance(value, tf.distribute.DistributedValues)
                                   else value), next(batches))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = maybe_symbolic_build


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops `fit` at the first batch whose loss is NaN or infinite and keeps `(epoch,
    batch, loss)` in `diverged_at`, for the caller to raise; unlike Keras's
    `TerminateOnNaN`, which prints a line and lets `fit` return as if it had finished."""

    def __init__(self):
        super().__init__()
        self.diverged_at = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.diverged_at = (self._epoch, batch, float(loss))
            self.model.stop_training = True


class WriteOnTrainBegin(keras.callbacks.Callback):
    """Writes `text` to `path` (atomically) when training begins."""

    def __init__(self, path, text):
        super().__init__()
        self.path = path
        self.text = text

    def on_train_begin(self, logs=None):
        write_text(self.path, self.text)


class EpochHistory(keras.callbacks.Callback):
    """Every finished epoch's logs, kept in a JSON-lines file so that a resumed run reports
    the history of all its epochs, not only those of the last process.

    At the first epoch's start (after any restore has set the epoch it resumes at, whatever
    the order of the callbacks), the lines of the epochs before it are kept and the rest
    dropped; `result()` is `{name: [value per epoch]}`, like `fit`'s `History`. It must come
    before the backup callback, so that an epoch's line is on disk before the backup records
    the epoch as done.
    """

    def __init__(self, path):
        super().__init__()
        self.path = path
        self.epochs = {}
        self._started = False

    def on_train_begin(self, logs=None):
        self._started = False

    def on_epoch_begin(self, epoch, logs=None):
        if not self._started:
            self._keep_before(epoch)

    def on_train_end(self, logs=None):
        # A run resumed after its last epoch's backup runs no epoch at all.
        if not self._started:
            self._keep_before(self.model._initial_epoch or 0)

    def _keep_before(self, first):
        self._started = True
        self.epochs = {}
        if first and os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    entry = json.loads(line)
                    if entry["epoch"] < first:
                        self.epochs[entry["epoch"]] = entry
        write_text(self.path, "".join(json.dumps(self.epochs[number]) + "\n"
                                      for number in sorted(self.epochs)))

    def on_epoch_end(self, epoch, logs=None):
        entry = {"epoch": epoch, **{key: float(value) for key, value in (logs or {}).items()}}
        self.epochs[epoch] = entry
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def result(self):
        history = {}
        for epoch in sorted(self.epochs):
            for key, value in self.epochs[epoch].items():
                if key != "epoch":
                    history.setdefault(key, []).append(value)
        return history


class ProgressLog(keras.callbacks.Callback):
    """Appends `{"epoch", "initial_epoch", "pid"}` to a JSON-lines file at every epoch
    start, so a resumed run is visible (its first epoch is not 0)."""

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_epoch_begin(self, epoch, logs=None):
        with open(self.path, "a") as f:
            f.write(json.dumps({"epoch": epoch, "initial_epoch": self.model._initial_epoch,
                                "pid": os.getpid()}) + "\n")


def _write_scalars(logdir, evaluation, step):
    writer = tf.summary.create_file_writer(logdir)
    with writer.as_default():
        for task, values in evaluation["tasks"].items():
            for name, value in values.items():
                tf.summary.scalar(f"{task}/{name}", float(value), step=step)
    writer.close()


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"Not JSON serialisable: {value!r}")
