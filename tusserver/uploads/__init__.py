"""The upload service: create, append (small or streamed), leases, hashing, concat, expiry."""
