"""Pure tests: parsers, grammar, vocabulary, layouts. No daemon, no mount, no process."""
