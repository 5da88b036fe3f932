"""Small pieces both halves need: errors, model loading, demo assets, the shard schema."""
