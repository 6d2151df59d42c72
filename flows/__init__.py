"""Prefect flows (thin orchestration over the changedet library)."""
