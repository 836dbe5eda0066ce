"""Built-in compressors, one method per module, each registered under its DESIGN §4 name.

Modules are imported on first use by `mmcompress.create`; import this package's modules directly to subclass.
"""
