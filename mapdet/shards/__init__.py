"""The packed format: WebDataset shards, their manifest, the writer (pack, merge) and the reader."""
