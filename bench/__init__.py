"""The benchmark suite (`aigc bench`, `make bench`): measurements of the running pipeline, never pass/fail."""
