"""The attention seam: methods that change what attention sees (prefix tuning: extra keys and values
in every layer)."""
