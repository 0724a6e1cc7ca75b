"""Data for the zoo: typed sample records, WebDataset shards and their DataModule, format readers.

``samples`` (records + batch contract), ``shards`` (schema, writers, ``ShardDataModule``),
``formats`` (published formats), ``convert`` (release -> shards), ``toy`` (procedural data).
This package never imports ``zoo``; the two share only ``datamodules.samples``.
"""
