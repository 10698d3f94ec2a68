"""diffsamplers.pipelines."""
