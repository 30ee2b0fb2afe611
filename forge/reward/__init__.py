"""Rewards: outcome plus shaping terms, and the advantage estimators built on them."""
