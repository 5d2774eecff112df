"""Stand-ins for hardware this machine lacks, and generated test data."""
