"""Ports: the interfaces the orchestrator and services need from the outside world."""
