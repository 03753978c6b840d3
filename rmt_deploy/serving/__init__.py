"""Serving an exported RMT with Triton Inference Server: model repositories
(``rmt-triton``), the python-backend model that keeps each sequence's memory, and a
client that streams a long document to Triton segment by segment.

serving/ reads the manifest and uses the runtime; the runtime never imports serving/.
"""
