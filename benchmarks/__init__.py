"""Benchmarks: `loopctl bench NAME` runs `benchmarks/NAME.py:run(cfg)` and writes
`benchmarks/results/NAME.json` with the machine it ran on."""
