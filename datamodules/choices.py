"""The `data.preprocess` and `data.augment` choices with what each means.

Pure Python, so that settings, sweep files and exports can check a name without importing
torch; preprocess.py and loader.py hold the implementations and check at import that they
implement exactly these names.
"""

PREPROCESS_CHOICES: dict[str, str] = {
    "gcn-zca": "the paper's global contrast normalisation and ZCA whitening",
    "standardize": "per-channel mean and std of the training images",
}

AUGMENT_CHOICES: dict[str, str] = {
    "none": "no augmentation",
    "flip-translate": "random horizontal flips and translations of up to 5 px (the paper's)",
}
