"""Deployment: sidecars, the deploy/ files, alert rules, and the pod in a container runtime."""
