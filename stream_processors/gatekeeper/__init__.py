"""The gatekeeper stage: validate, dedupe, moderate, rate-limit and fan out generation requests."""
