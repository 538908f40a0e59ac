"""The protocol node: Maelstrom-style JSON messages in, replies and events out."""
