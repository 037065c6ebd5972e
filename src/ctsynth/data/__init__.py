"""Data: the phantom, ingest, preprocessing, the patient split, the slice store, augmentation."""
