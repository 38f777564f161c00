"""Speed benchmarks: each compares calibprompt with a reference design in one run and writes
``benchmarks/results/<name>.json``. Run all with ``python -m benchmarks`` (``make bench``)."""
