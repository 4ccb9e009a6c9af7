"""Throughput benchmarks, one module per stage, run through ``python bench.py MODE`` (``cli.py``).

``data`` (DALI views graph vs baseline loader vs decode-only), ``model`` (grouped multi-view runner vs
a per-view loop), ``e2e`` (training steps, DALI vs baseline loader), ``shard`` (the sharding job;
``shard_scale.py``: its driver's cost per input). They use the public APIs of ``shard_tools``,
``pipelines``, ``models``, ``objectives`` and ``training`` only, and ``footage`` for their inputs;
production code carries no benchmark-only parameters.
"""
