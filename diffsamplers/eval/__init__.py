"""diffsamplers.eval."""
