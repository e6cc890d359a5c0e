"""Fixtures shared by muon_ds's tests, benchmarks and demos, importable from one place.

``tiny_gpt`` (a small byte-level GPT), ``corpus`` (the standard library as text, and its
batches), ``training`` (the demo's loop), ``collectives`` (a counter of every
``torch.distributed`` collective's bytes), ``zero1`` (ZeRO-1's even split as shard views)
and ``ports``. Nothing in the optimizer imports this package.
"""
