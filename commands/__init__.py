"""The commands on top of every product: the ``intentd`` CLI, the demo and the chaos soak harness."""
