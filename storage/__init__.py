"""Artifact storage: a content-addressed store over fsspec and the codecs for what goes in it."""

from ptqflow.storage.store import ArtifactCorrupted, ArtifactMissing, ArtifactRef, ArtifactStore, StoreError

__all__ = ["ArtifactCorrupted", "ArtifactMissing", "ArtifactRef", "ArtifactStore", "StoreError"]
