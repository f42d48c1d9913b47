"""Training: one step (loss, gradient reductions, update), AdamW, the token stream, the training checkpoint and
the `shardwise train` run on each rank."""
