"""Entrypoints for `ray job submit -- python -m jobs.<stage>`; each is `sdsg <stage>`."""
