"""Throughput: codec speed, recorded as repeated samples and compared with baselines."""
