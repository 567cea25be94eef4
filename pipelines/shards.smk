# shards rules (being written)
