"""Test helpers: starting real services on loopback ports and driving them."""
