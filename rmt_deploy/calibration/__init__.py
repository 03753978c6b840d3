"""INT8 calibration that respects the recurrence (not yet implemented; see the issues)."""
