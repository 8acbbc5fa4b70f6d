"""Speed, memory and quality benchmarks of quantnoise, sharing one harness (``benchmarks/harness.py``)."""
