"""The benchmark harness: tusserver beside a raw disk write, a bare aiohttp append handler and
the Node reference server, in one run on one machine. `python -m benchmarks.run --help`."""
