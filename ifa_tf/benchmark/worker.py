"""One benchmark job in its own process, so that its peak memory is its own.

    python -m ifa_tf.benchmark.worker '<job as JSON>'

prints one JSON record per measurement, one per line.
"""

import json
import os
import sys
import time

import numpy as np


def time_samples(fn, repeats, warmup):
    """Runs `fn` `warmup` times, then `repeats` timed times: each time, in milliseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def time_callable(fn, repeats, warmup):
    """`summarize` of `time_samples(fn, repeats, warmup)`."""
    return summarize(time_samples(fn, repeats, warmup))


def summarize(samples_ms):
    samples = np.asarray(samples_ms)
    return {"median_ms": float(np.median(samples)), "p10_ms": float(np.percentile(samples, 10)),
            "p90_ms": float(np.percentile(samples, 90)), "min_ms": float(samples.min()),
            "repeats": int(samples.size),
            # Other work on the machine skews timings; the record says how much there was.
            "load_average_1min": round(os.getloadavg()[0], 2)}


def _status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss():
    """Resets the process's peak RSS (Linux >= 4.0), so start-up peaks are not counted.
    Returns the current RSS in MB, the baseline of later peaks."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def peak_rss_mb():
    return _status_mb("VmHWM")


def scoring_function(job):
    """A callable features -> outputs: the Keras model, or the exported SavedModel's
    `serving_default` loaded alone, as a server would."""
    import tensorflow as tf

    import ifa_tf

    if job["path"] == "keras":
        model = ifa_tf.zoo.build(job["model"], **job.get("overrides", {}))
        # One trace for every shape, as the SavedModel has: a trace specialised to the
        # first shape and a generic one for the rest would not compare like with like.
        call = tf.function(lambda features: model(features, training=False),
                           input_signature=[model.schema.serving_specs()])
        return lambda features: call(features)["score"].numpy()
    serving = tf.saved_model.load(job["export_dir"]).signatures["serving_default"]
    return lambda features: serving(**features)["ranked_item_ids"].numpy()


def export_job(job):
    import ifa_tf
    from ifa_tf.export import export_saved_model

    model = ifa_tf.zoo.build(job["model"], **job.get("overrides", {}))
    export_dir = export_saved_model(model, job["export_base"],
                                    version=1, jit_compile=job.get("jit_compile", False))
    yield {"kind": "export", "model": job["model"], "export_dir": str(export_dir)}


def score_job(job):
    import tensorflow as tf

    import ifa_tf
    from ifa_tf.benchmark.requests import random_request

    schema = ifa_tf.default_schema()
    score = scoring_function(job)
    # One small request first, as TF Serving runs an export's warm-up requests at load:
    # building the executor and its kernels is the model's start-up, not a request's cost.
    score({k: tf.constant(v) for k, v in random_request(schema, 8, 8).items()})
    baseline = reset_peak_rss()
    prepared = []
    for m, n in sorted(job["shapes"], key=lambda s: s[0] * s[1]):
        features = {k: tf.constant(v) for k, v in random_request(schema, m, n).items()}
        # TensorFlow's allocator counts the bytes of every tensor: its peak over this
        # shape's calls, above what was held before (the request itself), is the request's
        # working memory, exact and free of the page-level noise of RSS.
        held = _reset_cpu_memory_stats(tf)
        start = time.perf_counter()  # the first call of a shape: kernel selection, and
        score(features)  # XLA compilation on the saved_model_xla path
        first_call_ms = (time.perf_counter() - start) * 1e3
        for _ in range(max(job["warmup"] - 1, 0)):
            score(features)
        measured = {"first_call_ms": first_call_ms, "peak_memory_mb": peak_rss_mb() - baseline}
        if held is not None:
            peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
            measured["peak_tensor_mb"] = (peak - held) / 2**20
        prepared.append(((m, n), features, measured))
    # The timed calls go round the shapes, so a slow spell of a shared machine hits every
    # shape alike and the ratios between shapes (time vs n, vs m) keep their meaning.
    samples = [[] for _ in prepared]
    for _ in range(job["repeats"]):
        for times, (_, features, _) in zip(samples, prepared):
            start = time.perf_counter()
            score(features)
            times.append((time.perf_counter() - start) * 1e3)
    for times, ((m, n), _, measured) in zip(samples, prepared):
        yield {"kind": "score", "model": job["model"], "path": job["path"], "m": m, "n": n,
               "round": job.get("round", 0), **summarize(times), **measured,
               "samples_ms": times}


def _reset_cpu_memory_stats(tf):
    """Resets the CPU allocator's peak and returns the bytes it holds now, or None where
    this TensorFlow build's default CPU allocator keeps no statistics (then the peak
    tensor memory is left out and the RSS growth is the memory figure)."""
    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
    except ValueError:
        return None
    return tf.config.experimental.get_memory_info("CPU:0")["current"]


def train_job(job):
    import ifa_tf
    from ifa_tf.benchmark.requests import random_labels, random_request

    schema = ifa_tf.default_schema()
    model = ifa_tf.zoo.build(job["model"], schema=schema, **job.get("overrides", {}))
    model.compile()
    batch, m, n = job["batch_size"], job["m"], job["n"]
    features = random_request(schema, m, n, batch=batch)
    labels = random_labels(schema, batch, m)
    timing = time_callable(lambda: model.train_on_batch(features, labels), job["repeats"],
                           job["warmup"])
    yield {"kind": "train", "model": job["model"], "m": m, "n": n, "batch_size": batch,
           **timing, "requests_per_s": batch / (timing["median_ms"] / 1e3)}


def attention_job(job):
    """IFA's FSM attention (`NormalizedLinearAttention` as `zoo.build("ifa")` configures it)
    on one request: the time inside a graph (what the module costs within a model) and
    the latency of one call from Python, with and without XLA."""
    import tensorflow as tf

    from ifa_tf.benchmark.flops import linear_attention_bytes, linear_attention_flops
    from ifa_tf.layers import NormalizedLinearAttention

    m, n, depth, heads, key_dim = job["m"], job["n"], job["depth"], job["heads"], job["key_dim"]
    layer = NormalizedLinearAttention(heads, key_dim, use_output_projection=False)
    rng = np.random.default_rng(0)
    # Two requests (a served one: every position valid); the loop below alternates them.
    inputs = (tf.constant(rng.normal(size=(2, 1, m, depth)), tf.float32),
              tf.constant(rng.normal(size=(2, 1, n, depth)), tf.float32),
              tf.ones((1, m), tf.bool), tf.ones((1, n), tf.bool))
    call = tf.function(lambda q, k, qm, km: layer(q[0], k[0], query_mask=qm, key_mask=km))
    latency = time_callable(lambda: call(*inputs).numpy(), job["repeats"], job["warmup"])
    iterations = job["loop_iterations"]
    record = {"kind": "attention", "m": m, "n": n, "depth": depth, "heads": heads,
              "key_dim": key_dim, "loop_iterations": iterations,
              "call_median_ms": latency["median_ms"]}
    for suffix, jit_compile in (("", False), ("xla_", True)):
        single, looped = (_attention_loop(layer, count, jit_compile) for count in
                          (1, 1 + iterations))
        for _ in range(max(job["warmup"], 1)):
            single(*inputs).numpy(), looped(*inputs).numpy()
        samples = []
        for _ in range(job["repeats"]):
            start = time.perf_counter()
            single(*inputs).numpy()
            middle = time.perf_counter()
            looped(*inputs).numpy()
            end = time.perf_counter()
            samples.append(((end - middle) - (middle - start)) / iterations * 1e3)
        timing = summarize(samples)
        record.update({suffix + key: value for key, value in timing.items()})
    weights = sum(int(np.prod(w.shape)) for w in layer.weights)
    record["flops"] = linear_attention_flops(m, n, depth, depth, depth, heads, key_dim,
                                             key_dim)
    record["bytes"] = linear_attention_bytes(m, n, depth, depth, heads * key_dim, weights)
    yield record


def _attention_loop(layer, iterations, jit_compile):
    """A function running `layer` `iterations` times in one graph (a while loop); the
    difference between two counts, per iteration, excludes the call's fixed costs."""
    import tensorflow as tf

    @tf.function(jit_compile=jit_compile)
    def run(queries, keys, query_mask, key_mask):
        def body(i, total):
            # Iteration i takes request i % 2 (queries and keys are [2, B, ., d]), so no part
            # of an iteration can be hoisted out of the loop (XLA would). The pick is a view
            # on TensorFlow (a slice along the first axis) and a dynamic slice fused into its
            # consumer under XLA: no pass of its own. The whole output is consumed (XLA would
            # otherwise narrow the products to the rows read) by one matvec, ~1/3 of the
            # cost of a reduction kernel over [m, h*v]; it is counted in the module's time.
            out = layer(queries[i % 2], keys[i % 2], query_mask=query_mask, key_mask=key_mask)
            rows = tf.reshape(out, (-1, out.shape[-1]))
            used = tf.matmul(tf.ones((1, tf.shape(rows)[0]), rows.dtype), rows)
            return i + 1, total + tf.reduce_sum(used)

        return tf.while_loop(lambda i, _: i < iterations, body, (0, 0.0),
                             parallel_iterations=1)[1]

    return run


JOBS = {"export": export_job, "score": score_job, "train": train_job, "attention": attention_job}


def main(argv):
    job = json.loads(argv[1])
    for record in JOBS[job["kind"]](job):
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(sys.argv)
