"""The label value every loss skips (PyTorch's cross-entropy default).

The data readers write it wherever a position must not be trained on: padding, prompts, the first token of the
next packed document. It is defined here, with the losses that give it its meaning, so the data layer imports
the losses' convention and the losses never import the data layer.
"""

IGNORE_INDEX = -100
