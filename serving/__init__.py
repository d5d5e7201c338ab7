"""The Ray Serve application of mint-ray (``serving.app:build_app``)."""
