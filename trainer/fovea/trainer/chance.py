"""Whether a run's test accuracy can be told apart from guessing, and what to do when it cannot.

Guessing among k classes scores about 1/k. On n test images the accuracy of a guesser is binomial, so
its standard deviation is sqrt(p(1-p)/n) with p = 1/k; an accuracy within CHANCE_SIGMAS of them above
1/k (about the one-sided 98% bound) has not shown that the model learned anything. With few test
images that bound is wide (3 classes, 9 test images: up to 0.648), which is itself worth knowing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

CHANCE_SIGMAS = 2.0


def chance_bound(classes: int, test_images: int) -> float:
    """The highest accuracy still within CHANCE_SIGMAS binomial standard deviations of guessing."""
    p = 1.0 / classes
    return p + CHANCE_SIGMAS * math.sqrt(p * (1.0 - p) / test_images)


def weights_text(weights: str, parent: str = "") -> str:
    """What the base started from, in words: the report's and the log's one description."""
    if parent:
        return f"published version {parent}"
    if weights.lower() == "none":
        return "random (--weights none: trained from scratch)"
    if weights.lower() == "imagenet":
        return "ImageNet"
    return f"file {weights}"


def warnings(
    *, accuracy: float, classes: int, test_images: int, train_images: Mapping[str, int], weights: str
) -> list[str]:
    """Sentences for the end of training and the report when the accuracy is near chance; [] otherwise."""
    if classes < 2 or test_images < 1:
        return []
    bound = chance_bound(classes, test_images)
    if accuracy > bound:
        return []
    fewest = min(train_images.values(), default=0)
    out = [
        f"test accuracy {accuracy:.3f} is near chance: guessing among {classes} classes scores "
        f"{1 / classes:.3f}, and on {test_images} test images anything up to {min(bound, 1.0):.3f} is "
        "within two standard deviations of guessing. This model has not shown that it learned anything."
    ]
    if weights.lower() == "none":
        out.append(
            f"It was trained from random weights (--weights none) on {fewest} training images per class at "
            "the fewest: far too few to learn features from scratch (that takes thousands per class). "
            "Start from pretrained features instead: --weights imagenet (the default; downloaded once) or "
            "--weights PATH.h5 (a local file of them), or add many more images."
        )
    else:
        out.append(
            f"It had {fewest} training images per class at the fewest. Check that each folder holds the "
            "class it is named for, add images, or train longer (--epochs, --fine-tune-epochs)."
        )
    if test_images < 10 * classes:
        out.append(
            f"{test_images} test images are few to judge {classes} classes by: more images (or a larger "
            "--test-split) make the test accuracy meaningful."
        )
    return out
