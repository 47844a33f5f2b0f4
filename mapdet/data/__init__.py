"""From shards (or image folders) to device batches: streaming loaders and GPU augmentation."""
