"""The GPU consumers: renderer processes that take render tasks from Kafka and render them on a device."""
