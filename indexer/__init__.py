"""raee-index: the offline indexer that builds, inspects, merges and tunes exit stores."""
