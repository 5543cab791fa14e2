"""The demo model's world: simple scenes drawn by code, a model trained on them, and a check that a
picture shows its caption.

`scenes` draws scenes and captions them in English and Chinese; `vocabulary` writes the word-level CLIP
tokenizer
for those captions; `checker` scores an image against the scene its caption describes with OpenCV; `training`
trains the small text-to-image model into a StableDiffusionPipeline folder; `evaluation` measures how often
the
model draws what it was asked on combinations it never saw.
"""
