"""Unprivileged users attacking: permissions, escapes, names, hostile input, deny, floods, reads."""
