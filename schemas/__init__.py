"""The pipeline's contract: Avro schemas, their typed records, the codec, and the error taxonomy."""
