"""Plugin placeholder: replaced by the real plugin."""
