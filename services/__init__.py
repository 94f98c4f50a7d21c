"""ZVT Fleet: the platform core and its services."""
