"""What a finished variant is measured for: MTP speed and acceptance (smoke), GPU fit, and KLD/PPL against the source."""
