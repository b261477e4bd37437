"""Properties: hypothesis invariants of the 4-bit codec, and reference == bitsandbytes on cpu."""
