"""Benchmark suites: one `bench_<subject>.py` per subject, the shared harness in `common.py`, the runner in `run.py`."""
