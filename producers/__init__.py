"""The client SDK other services use to submit and follow generation requests, and its CLI verbs."""
