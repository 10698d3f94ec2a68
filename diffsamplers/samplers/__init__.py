"""diffsamplers.samplers."""
