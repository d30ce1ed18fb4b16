"""The frozen base: presets, building and loading SD1.5-style components (hub ids, diffusers folders, single
files, the project's own base files), the CLIP tokenizer and the single-file export."""
