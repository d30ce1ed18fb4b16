"""The shapes world: its renderer, captions, graphs and evaluator, its tiny CLIP, and the embedded default
(base, CLIP and adapter in ``sg2img/assets``) that ``make demo`` shows."""
