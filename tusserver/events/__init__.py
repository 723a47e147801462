"""Events for the parent service: the per-shard outbox, webhook delivery, the pre-create call."""
