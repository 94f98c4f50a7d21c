"""The order service: owns order records and moves them through the state machine."""
