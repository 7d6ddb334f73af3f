"""The browser page served by `encinfer web` (package data only)."""
