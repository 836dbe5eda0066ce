"""Per-family descriptions for the generic placeholder adapter."""
