"""The data pipeline: raw WebDataset shards to training-ready Parquet shards on Ray Data."""
