"""Looking inside the model: perplexity (and, later, confidence, attention maps, logit lens)."""
