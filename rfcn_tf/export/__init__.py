"""Deployment: SavedModel export (TF OD API signature)."""
