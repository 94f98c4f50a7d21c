"""Replay: rebuild positions from the event store and compare them with the live state."""
