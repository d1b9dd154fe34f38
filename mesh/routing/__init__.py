"""The routing decision as pure functions: match, weights, hash keys, headers, decide."""
