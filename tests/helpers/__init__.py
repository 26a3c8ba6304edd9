"""Test-only helpers (independent reference implementations)."""
