"""fastalign-bench: benchmarks of every op against its baselines (see ``python -m fastalign.bench -h``)."""
