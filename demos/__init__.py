"""Gradio demo of mmcompress (installed as ``mmcompress.demos``).

Importing this package imports neither torch nor gradio; the pieces that need them import them lazily.
"""
