"""The engine: tracked entries, their state file, reading with enforcement,
and the commands (register, deregister, quota, reset)."""
