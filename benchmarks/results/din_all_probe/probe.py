"""Seconds per training step of din (k=100) and din k=None on MovieLens-1M batches."""
import time, resource
import keras
from ifa_tf import zoo
from ifa_tf.data import make_dataset, records
d = "/tmp/zoo15/data/movielens_1m"  # written by benchmarks/zoo_results.py
schema = records.schema_from_metadata(records.read_metadata(d))
for k in (100, None):
    keras.utils.set_random_seed(0)
    model = zoo.build("din", schema=schema, k=k)
    model.compile()
    ds = make_dataset(d + "/train-*", schema=schema, batch_size=64, group_by_length=16, seed=0)
    times, ns = [], []
    for i, (x, y) in enumerate(ds.take(25)):
        t = time.time(); model.train_on_batch(x, y); times.append(time.time() - t)
        ns.append(int(x["seq_item_id"].shape[1]))
    print(f"k={k}: {sum(times[5:]) / len(times[5:]):.3f} s/step over steps 5-24 (n {min(ns)}-{max(ns)}), "
          f"max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB", flush=True)
