"""Settings (frozen, hashed specs), the catalog of tiers, and the thresholds table."""
