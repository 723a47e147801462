"""The supervisor: binds, starts the embedded Valkey, serves in-process or forks workers."""
