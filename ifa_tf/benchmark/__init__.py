"""`ifa-bench`: scoring latency, peak memory and training throughput of every zoo model,
through the Keras model and through the exported SavedModel, beside this machine's matmul
and memory-bandwidth ceilings."""
