"""Relational pseudo-labelling: captions → triplets → candidate pairs → Relation Tagger → scene graphs."""
