"""The assembler sink: collect rendered frames, store final images and videos, record metadata,
and emit exactly one completion per request."""
