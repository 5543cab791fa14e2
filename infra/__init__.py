"""Local infrastructure: resolve Kafka, Cassandra and S3Proxy jars with Maven, run them, bootstrap them."""
