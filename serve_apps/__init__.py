"""Ray Serve applications: where `serve.deployment` is applied to the plain classes of `loop/`."""
