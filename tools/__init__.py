"""Developer tools: offline manifest/Terraform checks and the DeepSpeed op pre-build.

Not part of the runtime package; their dependencies are in the ``dev`` extra.
"""
