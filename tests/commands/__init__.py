"""The commands: `restrack` (and `restrack run`), the daemon's options and life, install, bench."""
