"""Data plane: shard manifest, shard writer, dataset sources and the streaming loader."""
