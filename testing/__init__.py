"""intentd.testing: test your own agents against a real control plane and sidecar."""
