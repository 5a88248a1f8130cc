"""Shared at the bottom of every layer: specs, the runtime protocols, startup steps."""
