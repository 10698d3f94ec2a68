"""diffsamplers.train."""
