"""meshplan: plan, simulate and run parallel training of large transformers."""
