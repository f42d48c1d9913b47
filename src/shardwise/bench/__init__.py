"""Benchmarks run by ``shardwise bench``: each rank measures itself and rank 0 collects the rows."""
