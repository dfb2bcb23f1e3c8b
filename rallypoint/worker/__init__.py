"""The rank process: sharded decoder, shard loading, serving loop and API."""
