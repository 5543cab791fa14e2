"""Webhook delivery: Completions POSTed, signed per Standard Webhooks, to each request's or tenant's URL."""
