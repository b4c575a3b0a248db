"""Tiny stand-ins the tests and the demo build themselves (nothing is downloaded): per model family, tokenizer files
trained on the synthetic task and loaded by torchtune's own tokenizer classes (``family_tokenizers``)."""
