"""Serve a registered student over HTTP with Ray Serve (``mint-ray serve``).

One concern per module; nothing is imported here, so importing one module does
not pull in the others (``config`` needs no Ray Serve).
"""
