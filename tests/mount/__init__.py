"""The mounted filesystem through a real daemon: files, errors, faults, client, peaks, load."""
