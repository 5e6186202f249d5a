"""The shapes world: procedural one-object scenes with exact ground truth, the built-in prior
trained on them, a shape/color classifier, and evaluation of generated 3D against the truth."""
