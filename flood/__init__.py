"""Flood: a spool directory turned into verified objects in S3-compatible storage."""

__version__ = "0.2.0"
