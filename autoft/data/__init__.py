"""Images in: scanning folders and CSVs, decoding, the on-disk image store, datasets and folds, augmentation."""
