"""The predictor, the runtimes it runs on, and the metrics of its answers."""
