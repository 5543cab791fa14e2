"""The top of the layer order: the `aigc` command, which may import every package below it.

Layers, bottom to top: schemas < plumbing < infra < stages < producers < bench < aigc
(tests/unit/test_layers.py enforces the order; README.md's "Layers" says what each holds).
"""
