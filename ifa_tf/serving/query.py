"""`ifa-query`: asks a running server (TF Serving or ifa-serve) to rank one request and
prints the list.

    ifa-query --target=localhost:8500 --model_name=ifa \\
        [--data='data/test-*.tfrecord.gz'] [--protocol=rest] [--top=10]

The request is the first example of `--data` when given, else random ids shaped by the
schema recorded in the export metadata (`--export_dir`) or the default schema. It loads no
TensorFlow (the clients need none, and the record is read by `records.read_records`), so it
answers a warm server in well under a second from a cold process.
"""

import time

import numpy as np
from absl import flags


def define_flags(flag_values=flags.FLAGS):
    """Defines the query flags (at run time, so other tools may reuse names)."""
    f = flag_values
    flags.DEFINE_string("target", "localhost:8500",
                        "host:port (gRPC port, or REST with --protocol).", flag_values=f)
    flags.DEFINE_string("model_name", "ifa", "Served model name.", flag_values=f)
    flags.DEFINE_enum("protocol", "grpc", ["grpc", "rest"], "Client protocol.", flag_values=f)
    flags.DEFINE_string("data", "", "TFRecord glob; its first request is sent.", flag_values=f)
    flags.DEFINE_string("export_dir", "", "A version directory whose metadata gives the schema.",
                        flag_values=f)
    flags.DEFINE_integer("candidates", 50, "m of a random request.", flag_values=f)
    flags.DEFINE_integer("sequence_length", 500, "n of a random request.", flag_values=f)
    flags.DEFINE_integer("top", 10, "Candidates printed.", flag_values=f)
    flags.DEFINE_float("wait_s", 60.0, "How long to wait for the model to become available.",
                       flag_values=f)


FLAGS = flags.FLAGS



def first_request(data, schema):
    """The first request of a TFRecord glob (its first file's first record), as batched
    NumPy features."""
    from ifa_tf.data import records

    path = records.expand_file_pattern(data)[0]
    serialized = next(records.read_records(path), None)
    if serialized is None:
        raise ValueError(f"{path} holds no request")
    request = records.decode_example(serialized, schema, with_labels=False, with_extras=False)
    return {name: np.asarray(request[name])[np.newaxis] for name in schema.feature_names}


def random_request(schema, m, n, seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.integers(1, 100_000, size=(1,) if schema.rank(name) == 1 else (
        1, n if name in schema.sequence_features else m), dtype=np.int64)
        for name in schema.feature_names}


def wait_until_available(client, wait_s):
    from ifa_tf.serving import ServingError

    deadline = time.monotonic() + wait_s
    while True:
        try:
            if any(state == "AVAILABLE" for _, state, _ in client.model_status(timeout=2)):
                return
        except ServingError:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"{client.model_name} not AVAILABLE after {wait_s}s")
        time.sleep(0.5)


def format_ranking(ranking, top, tasks=None, names=None):
    """A text table of the first `top` candidates: item, score and every task probability.

    The item is its raw id when the answer carries them (`serving_raw`) or `names` ({id:
    raw id}, e.g. a converted log's `read_vocabulary(dataset, "item")`) has it, else its
    int64 id; the column is as wide as its longest entry (raw ids cut at 40 characters)."""
    lines = [f"model version {ranking.version}: {len(ranking.item_ids)} candidates ranked"]
    tasks = [t for t in (tasks or sorted(ranking.scores)) if t != "score"]
    shown = min(top, len(ranking.item_ids))
    if ranking.raw_item_ids is not None:
        items = list(ranking.raw_item_ids[:shown])
    else:
        items = [(names or {}).get(int(i), str(i)) for i in ranking.item_ids[:shown]]
    items = [item if len(item) <= 40 else item[:39] + "…" for item in items]
    width = max([len("item"), *(len(item) for item in items)])
    lines.append(f"rank  {'item':<{width}}  score     " + "  ".join(f"{t:>10}" for t in tasks))
    for position in range(shown):
        lines.append(f"{position + 1:>4}  {items[position]:<{width}}  "
                     f"{ranking.scores['score'][position]:.6f}  "
                     + "  ".join(f"{ranking.scores[t][position]:>10.6f}" for t in tasks))
    return "\n".join(lines)


def item_names(data):
    """`{item id: raw id}` of the converted log that `data` (a TFRecord glob) belongs to,
    when it has an item vocabulary; None otherwise."""
    import glob
    import json
    import os

    from ifa_tf.data import read_vocabulary

    files = sorted(glob.glob(data))
    if not files:
        return None
    directory = os.path.dirname(os.path.abspath(files[0]))
    metadata_path = os.path.join(directory, "metadata.json")
    if not os.path.isfile(metadata_path):
        return None
    with open(metadata_path) as f:
        if "item" not in json.load(f).get("vocabularies", {}):
            return None
    return read_vocabulary(directory, "item")


def main(argv):
    del argv
    from ifa_tf import signatures
    from ifa_tf.schema import FeatureSchema, default_schema
    from ifa_tf.serving import connect

    metadata = signatures.read_metadata(FLAGS.export_dir) if FLAGS.export_dir else None
    schema = FeatureSchema.from_dict(metadata["schema"]) if metadata else default_schema()
    features = (first_request(FLAGS.data, schema) if FLAGS.data else
                random_request(schema, FLAGS.candidates, FLAGS.sequence_length))
    with connect(FLAGS.target, FLAGS.model_name, protocol=FLAGS.protocol) as client:
        wait_until_available(client, FLAGS.wait_s)
        ranking = client.rank(features)[0]
    names = item_names(FLAGS.data) if FLAGS.data else None
    print(format_ranking(ranking, FLAGS.top, schema.tasks, names))


def run():
    from ifa_tf import _deferred
    from ifa_tf.cli import run_app

    _deferred.defer("tensorflow")  # its protos only (tf.train.Example, TF Serving's API)
    define_flags()
    run_app(main, __name__, "ifa-query", library=lambda argv: False)


if __name__ == "__main__":
    run()
