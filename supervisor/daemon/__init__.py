"""The supervisor process: one loop per run, its attempts, socket server and file followers."""
