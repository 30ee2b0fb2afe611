"""Forge: an RL training harness for LLM agents (see README.md)."""

__version__ = "0.1.0"
