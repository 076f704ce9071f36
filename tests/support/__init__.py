"""What the tests share: the daemon harness (also bench's), users, processes, C programs."""
