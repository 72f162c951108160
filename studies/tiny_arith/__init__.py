"""The embedded models' tokenizer (shared by ``tiny-arith`` and ``tiny-chains``)."""
