"""The `data.preprocess` and `data.augment` choices with what each means.

Pure Python, so that settings, sweep files and exports can check a name without importing
torch; preprocess.py and loader.py hold the implementations and check at import that they
implement exactly these names.
"""

PREPROCESS_CHOICES: dict[str, str] = {
    "gcn-zca": "the paper's global contrast normalisation and ZCA whitening",
    "standardize": "per-channel mean and std of the training images",
}

# What `data.preprocess=auto` (the default) means, per data set. GCN + ZCA is the paper's, and
# on Fashion-MNIST with the paper's dropout it is what makes the eval-mode network as good as
# the noisy one: after `standardize` the background (raw 0) sits at -0.81, and input dropout
# makes a pattern eval mode never sees (docs/recipe.md gives the measured gap and the study
# that measured it). The synthetic gratings need no whitening, and a 3,072-dimensional ZCA
# fit would cost a smoke run more than its training.
AUTO_PREPROCESS: dict[str, str] = {
    "cifar10": "gcn-zca",
    "cifar100": "gcn-zca",
    "fashion-mnist": "gcn-zca",
    "synthetic": "standardize",
}

AUGMENT_CHOICES: dict[str, str] = {
    "none": "no augmentation",
    "flip-translate": "random horizontal flips and translations of up to 5 px (the paper's)",
}
