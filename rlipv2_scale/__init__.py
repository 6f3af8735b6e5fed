"""RLIPv2 at scale."""
