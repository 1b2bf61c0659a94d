"""Datasets, client partitions, tokenisation/preprocessing and batching (numpy only; runs on a device)."""

from fedpeft_edge.data.batches import iterate_batches, num_batches
from fedpeft_edge.data.datasets import (
    DATASET_NAMES,
    IMAGE_DATASETS,
    TEXT_DATASETS,
    ImageDataset,
    TextDataset,
    load_20newsgroups,
    load_bbc_news,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_mnist5k,
    load_reuters_r8,
    split_clients,
    subsample,
    train_test_split,
)
from fedpeft_edge.data.features import encode_for_model, iterate_encoded_batches
from fedpeft_edge.data.images import preprocess_images
from fedpeft_edge.data.partition import (
    PARTITION_SCHEMES,
    class_histograms,
    dirichlet_partition,
    group_partition,
    iid_partition,
    label_skew,
    partition,
)
from fedpeft_edge.data.text import TextEncoder

__all__ = [
    "DATASET_NAMES",
    "IMAGE_DATASETS",
    "PARTITION_SCHEMES",
    "TEXT_DATASETS",
    "ImageDataset",
    "TextDataset",
    "TextEncoder",
    "class_histograms",
    "dirichlet_partition",
    "encode_for_model",
    "group_partition",
    "iid_partition",
    "iterate_batches",
    "iterate_encoded_batches",
    "label_skew",
    "load_20newsgroups",
    "load_bbc_news",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist5k",
    "load_reuters_r8",
    "num_batches",
    "partition",
    "preprocess_images",
    "split_clients",
    "subsample",
    "train_test_split",
]
