"""The pipeline's stream processors: the gatekeeper, the assembler sink, the retry relay and webhooks."""
