"""The control side: what the CLI does to runs (create, spawn, stop, resume, remove) and the clients of a run."""
