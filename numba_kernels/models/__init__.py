"""Small language models built only from the public ops (not implemented yet)."""
